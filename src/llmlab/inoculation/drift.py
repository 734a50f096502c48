"""Stage inoculation_drift: behavioural and internal drift of each finetune, pre vs post.

On the held-out eval prompts under the neutral system prompt, for the base model and for
every adapter of the finetune stage:
- behavioural: the caps fraction of the generated answer (greedy by default), its shift
  post - pre per prompt, and the share of answers that are mostly capitals;
- internal: the projection of the pre_assistant residual onto v_l per layer, its mean shift
  post - pre (raw, and in units of the base model's SD across prompts at that layer).
Intervals are paired bootstraps over prompts; a condition pools its seeds per prompt.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.activations import CaptureItem, capture_to_disk, load_activations
from llmlab.generation import generate
from llmlab.inoculation.common import (
    DIRECTION_DIR,
    DRIFT_DIR,
    EVAL_PROMPTS,
    FINETUNE_CONDITIONS,
    MODELS_DIR,
    PLOTS_DIR,
    caps_fraction,
    conversation,
    load_direction,
    resolve_prompts,
    section,
)
from llmlab.inoculation.config import CANONICAL_POSITION
from llmlab.inoculation.finetune import RUNS_FILE
from llmlab.io import DataError, atomic_path, read_json, read_jsonl, write_json, write_jsonl
from llmlab.models import LoadedModel, load_model
from llmlab.params import load_params
from llmlab.plots import bar_with_ci, line_plot, write_series
from llmlab.stage import run_stage, seed_everything
from llmlab.stats import crossed_bootstrap_diff, proportion_ci

DRIFT_FILE = "drift.json"


def evaluate(
    loaded: LoadedModel,
    items: list[CaptureItem],
    layers: list[int],
    dirs: np.ndarray,
    acts_dir: Path,
    cfg: Any,
    seed: int,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return (answers, caps fractions [P], projections [P, L]) of one model on the eval prompts."""
    texts = generate(
        loaded,
        [it.messages for it in items],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=seed,
        batch_size=cfg.batch_size,
    )
    caps = np.array([caps_fraction(t) for t in texts], dtype=float)
    out = capture_to_disk(
        loaded, items, layers, acts_dir, position=CANONICAL_POSITION, progress=False
    )
    ids = [it.id for it in items]
    proj = np.stack(
        [
            load_activations(out, layer).select(ids).astype(np.float64) @ dirs[i]
            for i, layer in enumerate(layers)
        ],
        axis=1,
    )
    return texts, caps, proj


def shift_estimate(
    pre: np.ndarray, posts: list[np.ndarray], seed: int, n_boot: int
) -> dict[str, Any]:
    """Return the mean post - pre shift with a CI resampling seeds and prompts crossed.

    posts: one array over prompts per training seed (run). Between-seed variance enters the
    interval (`llmlab.stats.crossed_bootstrap_diff`); with one run it reflects prompts only.
    Prompts whose answer has no letters (NaN caps fraction) drop out; with none left the
    value is None and `reason` says why.
    """
    shifts = np.stack([np.asarray(p, dtype=float) - pre for p in posts])  # [seeds, prompts]
    try:
        return {
            **crossed_bootstrap_diff(shifts, n_boot=n_boot, seed=seed).to_dict(),
            "n_seeds": len(posts),
        }
    except ValueError as e:
        return {"value": None, "lo": None, "hi": None, "reason": str(e)}


def base_sd(base_proj: np.ndarray) -> np.ndarray:
    """Return the base model's SD across prompts per layer [L] (1 where it is 0)."""
    sd = base_proj.std(axis=0, ddof=1)
    sd[sd == 0] = 1.0
    return sd


def standardised_shift(proj: np.ndarray, base_proj: np.ndarray) -> np.ndarray:
    """Return the per-prompt, per-layer projection shift post - pre in base-SD units [P, L]."""
    return (proj - base_proj) / base_sd(base_proj)


def caps_share(caps: np.ndarray, threshold: float) -> dict[str, Any]:
    """Return the share of scorable answers whose caps fraction reaches the threshold (Wilson CI)."""
    ok = caps[np.isfinite(caps)]
    if ok.size == 0:
        return {"value": None, "reason": "no answer has letters"}
    return proportion_ci(int((ok >= threshold).sum()), int(ok.size)).to_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="inoculation")
    cfg = section(params)
    dc = cfg.drift
    n_boot = cfg.report.n_boot
    seed_everything(cfg.seed)
    prompts = resolve_prompts(cfg.prompts)
    rows = read_jsonl(EVAL_PROMPTS, required=("id", "prompt"), id_field="id")
    runs = read_json(MODELS_DIR / RUNS_FILE)["runs"]
    if not runs:
        raise DataError(f"{MODELS_DIR / RUNS_FILE}: no finetune runs")
    items = [CaptureItem(r["id"], conversation(prompts.neutral, r["prompt"])) for r in rows]
    ids = [r["id"] for r in rows]
    meta = read_json(DIRECTION_DIR / "direction.json")
    layers = [int(x) for x in meta["layers"]]
    loaded = load_model(params)
    direction = load_direction(DIRECTION_DIR, loaded.hidden_size, layers, model=loaded.name)
    dirs = direction.vectors
    acts_root = DRIFT_DIR / "activations"
    if acts_root.exists():
        shutil.rmtree(acts_root)
    texts, caps, proj = {}, {}, {}
    texts["base"], caps["base"], proj["base"] = evaluate(
        loaded, items, layers, dirs, acts_root / "base", dc, cfg.seed
    )
    model_name = loaded.name
    del loaded  # one model in memory at a time
    for run in runs:
        model = load_model(params, adapter=run["adapter"])
        # Merged weights generate at base-model speed; the adapter on disk is untouched.
        model.model = model.model.merge_and_unload()
        name = run["name"]
        texts[name], caps[name], proj[name] = evaluate(
            model, items, layers, dirs, acts_root / name, dc, cfg.seed
        )
        del model
    run_out = []
    for run in runs:
        name = run["name"]
        std_shift = standardised_shift(proj[name], proj["base"])  # [P, L]
        run_out.append(
            {
                "name": name,
                "condition": run["condition"],
                "seed": run["seed"],
                "caps_mean": _nanmean(caps[name]),
                "caps_share": caps_share(caps[name], dc.caps_threshold),
                "caps_shift": shift_estimate(caps["base"], [caps[name]], cfg.seed, n_boot),
                "projection_shift_std_layer_mean": shift_estimate(
                    np.zeros(len(ids)), [std_shift.mean(axis=1)], cfg.seed, n_boot
                ),
                "projection_shift_by_layer": [
                    {
                        "layer": layer,
                        "raw": float((proj[name][:, li] - proj["base"][:, li]).mean()),
                        "std": float(std_shift[:, li].mean()),
                    }
                    for li, layer in enumerate(layers)
                ],
            }
        )
    by_condition = {}
    for cond in FINETUNE_CONDITIONS:
        names = [r["name"] for r in runs if r["condition"] == cond]
        if not names:
            continue
        std = [standardised_shift(proj[n], proj["base"]) for n in names]
        by_condition[cond] = {
            "runs": names,
            "caps_shift": shift_estimate(caps["base"], [caps[n] for n in names], cfg.seed, n_boot),
            "projection_shift_std_layer_mean": shift_estimate(
                np.zeros(len(ids)), [s.mean(axis=1) for s in std], cfg.seed, n_boot
            ),
            "projection_shift_by_layer": [
                {"layer": layer, **shift_estimate(
                    np.zeros(len(ids)), [s[:, li] for s in std], cfg.seed, n_boot
                )}
                for li, layer in enumerate(layers)
            ],
        }  # fmt: skip
    out = {
        "model": model_name,
        "n_prompts": len(ids),
        "system_prompt": prompts.neutral,
        "max_new_tokens": dc.max_new_tokens,
        "temperature": dc.temperature,
        "caps_threshold": dc.caps_threshold,
        "layers": layers,
        "base": {
            "caps_mean": _nanmean(caps["base"]),
            "caps_share": caps_share(caps["base"], dc.caps_threshold),
        },
        "runs": run_out,
        "by_condition": by_condition,
    }
    write_json(DRIFT_DIR / DRIFT_FILE, out)
    write_jsonl(
        DRIFT_DIR / "generations.jsonl",
        [
            {"model": m, "id": i, "text": t, "caps_fraction": None if np.isnan(c) else float(c)}
            for m in texts
            for i, t, c in zip(ids, texts[m], caps[m], strict=True)
        ],
    )
    with atomic_path(DRIFT_DIR / "projections.npz", suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, layers=np.array(layers), **{k: v for k, v in proj.items()})
    write_plots(out, layers, model_name)
    for cond, v in by_condition.items():
        print(f"drift: {cond}: caps shift {_fmt(v['caps_shift'])}")


def _fmt(est: dict[str, Any]) -> str:
    if est.get("value") is None:
        return f"undefined ({est.get('reason')})"
    return f"{est['value']:+.4f} [{est['lo']:+.4f}, {est['hi']:+.4f}]"


def _triple(est: dict[str, Any]) -> tuple[float, float, float]:
    """Return (value, lo, hi) with NaN for an undefined estimate (drawn as a gap)."""
    if est.get("value") is None:
        return (float("nan"),) * 3
    return (est["value"], est["lo"], est["hi"])


def _nanmean(x: np.ndarray) -> float | None:
    ok = x[np.isfinite(x)]
    return float(ok.mean()) if ok.size else None


def write_plots(out: dict[str, Any], layers: list[int], model: str) -> None:
    """Write projection shift vs layer per condition and caps shift per condition."""
    conds = out["by_condition"]
    line_plot(
        PLOTS_DIR / "projection_shift_by_layer.png",
        layers,
        {c: [r["value"] for r in v["projection_shift_by_layer"]] for c, v in conds.items()},
        title=f"Projection shift onto v_l, post - pre finetune ({model})",
        xlabel="layer",
        ylabel="mean shift post - pre (base-SD units)",
        hline=0.0,
    )
    write_series(
        PLOTS_DIR / "projection_shift_by_layer.json",
        [
            {
                "layer": layer,
                **{c: v["projection_shift_by_layer"][li]["value"] for c, v in conds.items()},
            }
            for li, layer in enumerate(layers)
        ],
    )
    names = list(conds)
    bar_with_ci(
        PLOTS_DIR / "caps_shift_by_condition.png",
        names,
        {"caps fraction shift": [_triple(conds[c]["caps_shift"]) for c in names]},
        title=f"Caps-fraction shift on held-out prompts ({model})",
        ylabel="post - pre caps fraction (95% CI)",
    )
    write_series(
        PLOTS_DIR / "caps_shift_by_condition.json",
        [
            {
                "condition": c,
                "group": c,  # the colour of .dvc/plots/grouped_bars_ci.json
                "caps_shift": conds[c]["caps_shift"]["value"],
                "lo": conds[c]["caps_shift"]["lo"],
                "hi": conds[c]["caps_shift"]["hi"],
            }
            for c in names
        ],
    )


if __name__ == "__main__":
    run_stage(main)
