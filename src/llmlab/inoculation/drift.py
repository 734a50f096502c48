"""Stage inoculation_drift: behavioural and internal drift of each finetune, pre vs post.

On the held-out eval prompts, for the base model and for every adapter of the finetune stage,
under each test-time system prompt of `drift.test_prompts` (default: no system message, so
the template's own; neutral: the neutral text; inoculation). The primary reading, used by
the criteria, is under the prompt that matches the neutral training condition; the others
form the sweep in drift.json. Per prompt:
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
    items: dict[str, list[CaptureItem]],
    layers: list[int],
    dirs: np.ndarray,
    acts_root: Path,
    name: str,
    cfg: Any,
    seed: int,
) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """Return, per test prompt, (answers, caps fractions [P], projections [P, L]) of one model,
    its activations written to `acts_root/<test prompt>/<name>`.

    The answers under every test prompt come from one `generate` call: on CPU a decode step of
    48 rows costs about what one of 16 does, so one call of all rows decodes in a third of the
    steps of one call per test prompt.
    """
    order = [(tp, it) for tp, its in items.items() for it in its]
    texts = generate(
        loaded,
        [it.messages for _, it in order],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=seed,
        batch_size=cfg.batch_size,
    )
    out: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
    start = 0
    for tp, its in items.items():
        tp_texts = texts[start : start + len(its)]
        start += len(its)
        caps = np.array([caps_fraction(t) for t in tp_texts], dtype=float)
        acts = capture_to_disk(
            loaded, its, layers, acts_root / tp / name, position=CANONICAL_POSITION, progress=False
        )
        ids = [it.id for it in its]
        proj = np.stack(
            [
                load_activations(acts, layer).select(ids).astype(np.float64) @ dirs[i]
                for i, layer in enumerate(layers)
            ],
            axis=1,
        )
        out[tp] = (tp_texts, caps, proj)
    return out


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
    ids = [r["id"] for r in rows]
    # The primary test prompt matches the neutral training condition; the rest are the sweep.
    primary = prompts.primary_test_prompt()
    sweep = [primary] + [t for t in dc.test_prompts if t != primary]
    items = {
        tp: [CaptureItem(r["id"], conversation(prompts.test_prompt(tp), r["prompt"])) for r in rows]
        for tp in sweep
    }
    meta = read_json(DIRECTION_DIR / "direction.json")
    layers = [int(x) for x in meta["layers"]]
    loaded = load_model(params)
    direction = load_direction(DIRECTION_DIR, loaded.hidden_size, layers, model=loaded.name)
    dirs = direction.vectors
    acts_root = DRIFT_DIR / "activations"
    if acts_root.exists():
        shutil.rmtree(acts_root)
    # model -> test prompt -> (answers, caps fractions, projections)
    results = {"base": evaluate(loaded, items, layers, dirs, acts_root, "base", dc, cfg.seed)}
    model_name = loaded.name
    del loaded  # one model in memory at a time
    for run in runs:
        model = load_model(params, adapter=run["adapter"])
        # Merged weights generate at base-model speed; the adapter on disk is untouched.
        model.model = model.model.merge_and_unload()
        name = run["name"]
        results[name] = evaluate(model, items, layers, dirs, acts_root, name, dc, cfg.seed)
        del model
    every = {tp: {m: by_tp[tp] for m, by_tp in results.items()} for tp in sweep}
    caps = {m: v[1] for m, v in every[primary].items()}
    proj = {m: v[2] for m, v in every[primary].items()}
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
        "primary_test_prompt": primary,
        "system_prompt": prompts.test_prompt(primary),
        "test_prompts": {tp: prompts.test_prompt(tp) for tp in sweep},
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
        "sweep": prompt_sweep(every, runs, cfg.seed, n_boot),
    }
    write_json(DRIFT_DIR / DRIFT_FILE, out)
    write_jsonl(
        DRIFT_DIR / "generations.jsonl",
        [
            {
                "model": m,
                "test_prompt": tp,
                "id": i,
                "text": t,
                "caps_fraction": None if np.isnan(c) else float(c),
            }
            for tp, by_model in every.items()
            for m, (tx, cp, _) in by_model.items()
            for i, t, c in zip(ids, tx, cp, strict=True)
        ],  # fmt: skip
    )
    with atomic_path(DRIFT_DIR / "projections.npz", suffix=".npz") as tmp, open(tmp, "wb") as fh:
        # Primary test prompt under the model's name, the sweep's others as "<prompt>__<model>".
        extra = {f"{tp}__{m}": v[2] for tp in sweep[1:] for m, v in every[tp].items()}
        np.savez(fh, layers=np.array(layers), **proj, **extra)
    for cond, v in by_condition.items():
        print(f"drift: {cond}: caps shift {_fmt(v['caps_shift'])}")


def prompt_sweep(
    every: dict[str, dict[str, tuple[list[str], np.ndarray, np.ndarray]]],
    runs: list[dict[str, Any]],
    seed: int,
    n_boot: int,
) -> dict[str, Any]:
    """Return per test prompt and condition the caps and layer-mean projection shifts."""
    out: dict[str, Any] = {}
    for tp, by_model in every.items():
        _, base_caps, base_proj = by_model["base"]
        conds: dict[str, Any] = {}
        for cond in FINETUNE_CONDITIONS:
            names = [r["name"] for r in runs if r["condition"] == cond]
            if not names:
                continue
            conds[cond] = {
                "caps_mean": _nanmean(np.concatenate([by_model[n][1] for n in names])),
                "caps_shift": shift_estimate(
                    base_caps, [by_model[n][1] for n in names], seed, n_boot
                ),
                "projection_shift_std_layer_mean": shift_estimate(
                    np.zeros(len(base_caps)),
                    [standardised_shift(by_model[n][2], base_proj).mean(axis=1) for n in names],
                    seed,
                    n_boot,
                ),
            }
        out[tp] = {"base_caps_mean": _nanmean(base_caps), "by_condition": conds}
    return out


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


def draw_plots() -> None:
    """Draw this stage's plots from its cached drift.json (called by the report stage)."""
    out = read_json(DRIFT_DIR / DRIFT_FILE)
    write_plots(out, [int(x) for x in out["layers"]], out["model"])


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
