"""Stage inoculation_direction: the ALL-CAPS trait direction per layer, with its sanity checks.

v_l = mean h_l(pre_assistant | promote prompt) - mean h_l(pre_assistant | suppress prompt) over
the fit share of the direction prompts, normalised per layer. Sanity checks:
1. held-out prompts: projection under promote above projection under suppress (paired
   difference with a bootstrap CI, share of prompts, AUC);
2. under the neutral prompt, the projection of a held-out prompt against the caps fraction of
   the text the model generates for it (Pearson and Spearman r with Fisher-z CIs).
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from llmlab.activations import CaptureItem, capture_to_disk, load_activations
from llmlab.generation import generate
from llmlab.inoculation.common import (
    ACTIVATIONS_DIR,
    DIRECTION_DIR,
    DIRECTION_PROMPTS,
    OTHER_DIRECTIONS_FILE,
    PLOTS_DIR,
    caps_fraction,
    conversation,
    resolve_prompts,
    save_direction,
    section,
)
from llmlab.io import DataError, atomic_path, numbered, read_jsonl, write_json, write_jsonl
from llmlab.layers import resolve_layers
from llmlab.models import LoadedModel, decoder_layers, load_model
from llmlab.params import load_params
from llmlab.plots import scatter_plot, violin_plot, write_series
from llmlab.stage import run_stage, seed_everything
from llmlab.stats import (
    bootstrap_diff,
    hierarchical_bootstrap,
    pearson_ci,
    proportion_ci,
    spearman_ci,
)
from llmlab.steering import steer

POSITION = "pre_assistant"


def read_direction_prompts(path: Path = DIRECTION_PROMPTS) -> list[dict[str, Any]]:
    """Return the direction-extraction prompts; errors name the file and row."""
    rows = read_jsonl(path, required=("id", "prompt"), id_field="id")
    for n, row in numbered(rows):
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise DataError(f"{path}:{n}: id {row['id']!r}: prompt must be a non-empty string")
    return rows


def split_prompts(
    rows: list[dict[str, Any]], heldout_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return (fit, held-out) rows, holding out the same share of every domain (seeded)."""
    by_domain: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_domain[str(r.get("domain", "any"))].append(r)
    rng = random.Random(seed)
    fit: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    for domain in sorted(by_domain):
        group = list(by_domain[domain])
        rng.shuffle(group)
        k = max(1, round(heldout_fraction * len(group))) if len(group) > 1 else 0
        held += group[:k]
        fit += group[k:]
    rng.shuffle(held)
    if len(fit) < 4 or len(held) < 4:
        raise DataError(
            f"{DIRECTION_PROMPTS}: {len(rows)} prompts give {len(fit)} fit / {len(held)} held-out; "
            "need at least 4 of each"
        )
    return fit, held


def trait_direction(promote: np.ndarray, suppress: np.ndarray) -> tuple[np.ndarray, float]:
    """Return (unit mean-difference direction, norm of the raw difference), computed in fp64."""
    diff = promote.astype(np.float64).mean(axis=0) - suppress.astype(np.float64).mean(axis=0)
    norm = float(np.linalg.norm(diff))
    if norm == 0.0:
        raise DataError("trait direction: promote and suppress activations have the same mean")
    return (diff / norm).astype(np.float32), norm


def separation(
    proj_promote: np.ndarray, proj_suppress: np.ndarray, ids: list[str], seed: int
) -> dict[str, Any]:
    """Return held-out promote-vs-suppress separation: paired mean difference (CI), share, AUC, d."""
    diff = proj_promote - proj_suppress
    est = hierarchical_bootstrap({i: [float(d)] for i, d in zip(ids, diff, strict=True)}, seed=seed)
    share = proportion_ci(int((diff > 0).sum()), len(diff))
    labels = np.r_[np.ones(len(proj_promote)), np.zeros(len(proj_suppress))]
    auc = float(roc_auc_score(labels, np.r_[proj_promote, proj_suppress]))
    pooled = float(np.sqrt((proj_promote.var(ddof=1) + proj_suppress.var(ddof=1)) / 2))
    return {
        "mean_diff": est.to_dict(),
        "share_promote_higher": share.to_dict(),
        "auc": auc,
        "cohens_d": float(diff.mean() / pooled) if pooled > 0 else None,
        "pass": est.lo > 0,
    }


def correlation(proj: np.ndarray, caps: np.ndarray) -> dict[str, Any]:
    """Return Pearson and Spearman r of projection vs caps fraction, or the reason they are undefined."""
    out: dict[str, Any] = {"n_scored": int(np.isfinite(caps).sum())}
    for name, fn in (("pearson", pearson_ci), ("spearman", spearman_ci)):
        try:
            out[name] = fn(proj, caps).to_dict()
        except ValueError as e:
            out[name] = None
            out[f"{name}_undefined"] = str(e)
    out["pass"] = bool(out["pearson"] and out["pearson"]["lo"] > 0)
    return out


def caps_increase(
    caps_to: np.ndarray, caps_from: np.ndarray, ids: list[str], seed: int
) -> dict[str, Any]:
    """Return the paired caps-fraction increase (to - from) over prompts; pass when its CI > 0.

    Prompts whose answer has no letters on either side drop out.
    """
    ok = np.isfinite(caps_to) & np.isfinite(caps_from)
    kept = [i for i, k in zip(ids, ok, strict=True) if k]
    if len(kept) < 2:
        return {"value": None, "pass": False, "reason": f"{len(kept)} prompts scorable both ways"}
    est = bootstrap_diff(
        {i: [float(v)] for i, v in zip(kept, caps_to[ok], strict=True)},
        {i: [float(v)] for i, v in zip(kept, caps_from[ok], strict=True)},
        paired=True,
        seed=seed,
    ).to_dict()
    return {**est, "mean_to": float(caps_to[ok].mean()), "pass": est["lo"] > 0}


def steered_generations(
    loaded: LoadedModel,
    conversations: list[Any],
    layer: int,
    vector: np.ndarray,
    scale: float,
    dc: Any,
    seed: int,
) -> list[str]:
    """Return generations with scale * vector added to the output of one decoder layer."""
    vec = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
    return generate(
        loaded,
        conversations,
        max_new_tokens=dc.sanity_max_new_tokens,
        temperature=dc.sanity_temperature,
        seed=seed,
        batch_size=dc.batch_size,
        steer=lambda _rows, _mask: steer(decoder_layers(loaded.model), [layer], vec, scale),
    )


def other_trait_directions(
    loaded: LoadedModel, fit: list[dict[str, Any]], layers: list[int], dc: Any
) -> np.ndarray:
    """Return [T, L, hidden] unit directions of the unrelated traits, same recipe as v_trait."""
    fit_ids = [r["id"] for r in fit]
    out = []
    for trait in dc.other_traits:
        acts = {}
        for side, text in (("promote", trait.promote), ("suppress", trait.suppress)):
            items = [CaptureItem(r["id"], conversation(text, r["prompt"])) for r in fit]
            acts[side] = capture_to_disk(
                loaded, items, layers, ACTIVATIONS_DIR / f"other_{trait.name}_{side}",
                position=POSITION, batch_size=dc.batch_size,
            )  # fmt: skip
        out.append(
            np.stack(
                [
                    trait_direction(
                        load_activations(acts["promote"], layer).select(fit_ids),
                        load_activations(acts["suppress"], layer).select(fit_ids),
                    )[0]
                    for layer in layers
                ]
            )
        )
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="inoculation")
    cfg = section(params)
    dc = cfg.direction
    seed_everything(cfg.seed)
    prompts = resolve_prompts(cfg.prompts)
    rows = read_direction_prompts()
    if dc.n_prompts is not None:
        if dc.n_prompts > len(rows):
            raise DataError(f"{DIRECTION_PROMPTS}: {len(rows)} prompts < n_prompts {dc.n_prompts}")
        rows = random.Random(cfg.seed).sample(rows, dc.n_prompts)
    fit, held = split_prompts(rows, dc.heldout_fraction, cfg.seed)
    loaded = load_model(params)
    layers = resolve_layers(dc.layers, loaded.n_layers)
    plot_layers = resolve_layers(dc.plot_layers, loaded.n_layers)
    missing = [x for x in plot_layers if x not in layers]
    if missing:
        raise DataError(
            f"inoculation.direction.plot_layers: layer {missing[0]} not in direction layers"
        )

    acts = {}
    for cond, text in (("promote", prompts.promote), ("suppress", prompts.suppress)):
        items = [CaptureItem(r["id"], conversation(text, r["prompt"])) for r in fit + held]
        acts[cond] = capture_to_disk(
            loaded,
            items,
            layers,
            ACTIVATIONS_DIR / cond,
            position=POSITION,
            batch_size=dc.batch_size,
        )
    sanity_rows = held[: dc.n_sanity]
    neutral_items = [
        CaptureItem(r["id"], conversation(prompts.neutral_system, r["prompt"])) for r in sanity_rows
    ]
    acts["neutral"] = capture_to_disk(
        loaded, neutral_items, layers, ACTIVATIONS_DIR / "neutral", position=POSITION,
        batch_size=dc.batch_size,
    )  # fmt: skip
    texts = generate(
        loaded,
        [it.messages for it in neutral_items],
        max_new_tokens=dc.sanity_max_new_tokens,
        temperature=dc.sanity_temperature,
        seed=cfg.seed,
        batch_size=dc.batch_size,
    )
    caps = np.array([caps_fraction(t) for t in texts], dtype=float)
    promote_texts = generate(
        loaded,
        [conversation(prompts.promote, r["prompt"]) for r in sanity_rows],
        max_new_tokens=dc.sanity_max_new_tokens,
        temperature=dc.sanity_temperature,
        seed=cfg.seed,
        batch_size=dc.batch_size,
    )
    caps_promote = np.array([caps_fraction(t) for t in promote_texts], dtype=float)
    others = other_trait_directions(loaded, fit, layers, dc)

    fit_ids, held_ids = [r["id"] for r in fit], [r["id"] for r in held]
    sanity_ids = [r["id"] for r in sanity_rows]
    vectors, norms, per_layer, proj_store = [], {}, [], {}
    for layer in layers:
        p = load_activations(acts["promote"], layer)
        s = load_activations(acts["suppress"], layer)
        v, raw = trait_direction(p.select(fit_ids), s.select(fit_ids))
        vectors.append(v)
        norms[str(layer)] = raw
        pp = p.select(held_ids).astype(np.float64) @ v
        ps = s.select(held_ids).astype(np.float64) @ v
        pn = load_activations(acts["neutral"], layer).select(sanity_ids).astype(np.float64) @ v
        proj_store[layer] = (pp, ps, pn)
        per_layer.append(
            {
                "layer": layer,
                "raw_norm": raw,
                "separation": separation(pp, ps, held_ids, cfg.seed),
                "neutral_vs_caps": correlation(pn, caps),
            }
        )
    mid = plot_layers[len(plot_layers) // 2]
    mid_i = layers.index(mid)
    steer_scale = dc.steer_scale * norms[str(mid)]
    steered_texts = steered_generations(
        loaded, [it.messages for it in neutral_items], mid, vectors[mid_i], steer_scale, dc,
        cfg.seed,
    )  # fmt: skip
    caps_steered = np.array([caps_fraction(t) for t in steered_texts], dtype=float)
    checks = {
        "promote_produces_caps": caps_increase(caps_promote, caps, sanity_ids, cfg.seed),
        "steering_raises_caps": {
            **caps_increase(caps_steered, caps, sanity_ids, cfg.seed),
            "layer": mid,
            "scale": steer_scale,
            "scale_in_raw_norms": dc.steer_scale,
        },
    }
    save_direction(
        DIRECTION_DIR,
        layers,
        np.stack(vectors),
        {
            "model": loaded.name,
            "position": POSITION,
            "definition": "unit(mean h | promote - mean h | suppress) over the fit prompts",
            "promote": prompts.promote,
            "suppress": prompts.suppress,
            "n_fit": len(fit_ids),
            "n_heldout": len(held_ids),
            "fit_ids": fit_ids,
            "heldout_ids": held_ids,
            "raw_norms": norms,
            "other_traits": [t.model_dump() for t in dc.other_traits],
        },
    )
    with (
        atomic_path(DIRECTION_DIR / OTHER_DIRECTIONS_FILE, suffix=".npy") as tmp,
        open(tmp, "wb") as fh,
    ):
        np.save(fh, others.astype(np.float32))
    write_jsonl(
        DIRECTION_DIR / "sanity_generations.jsonl",
        [
            {
                "id": i,
                "condition": cond,
                "text": t,
                "caps_fraction": None if np.isnan(c) else float(c),
            }
            for cond, tx, cp in (
                ("neutral", texts, caps),
                ("promote", promote_texts, caps_promote),
                ("neutral_steered", steered_texts, caps_steered),
            )
            for i, t, c in zip(sanity_ids, tx, cp, strict=True)
        ],  # fmt: skip
    )
    n_sep = sum(r["separation"]["pass"] for r in per_layer)
    mid_row = next(r for r in per_layer if r["layer"] == mid)
    summary = {
        "model": loaded.name,
        "layers": layers,
        "n_fit": len(fit_ids),
        "n_heldout": len(held_ids),
        "n_sanity": len(sanity_ids),
        "sanity_temperature": dc.sanity_temperature,
        "neutral_caps_fraction_mean": float(np.nanmean(caps)) if np.isfinite(caps).any() else None,
        "separation_layers_passing": n_sep,
        "separation_pass": n_sep * 2 >= len(layers),
        "sanity_layer": mid,
        "neutral_correlation_at_sanity_layer": mid_row["neutral_vs_caps"],
        "correlation_pass": mid_row["neutral_vs_caps"]["pass"],
        **checks,
        "per_layer": per_layer,
    }
    write_json(DIRECTION_DIR / "sanity.json", summary)
    # The plots are drawn by the report stage from this cached file (see draw_plots), so this
    # GPU stage has cached outs only and restores from a pushed run-cache.
    save_plot_inputs(DIRECTION_DIR / PLOT_INPUTS, proj_store, plot_layers, mid, caps)
    print(
        f"direction: {len(layers)} layers; held-out separation passes at {n_sep}/{len(layers)}; "
        f"neutral r at layer {mid}: {mid_row['neutral_vs_caps'].get('pearson')}; promote "
        f"produces caps: {checks['promote_produces_caps']['pass']}; steering raises caps: "
        f"{checks['steering_raises_caps']['pass']}"
    )


PLOT_INPUTS = "plot_inputs.npz"


def save_plot_inputs(
    path: Path,
    proj: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
    plot_layers: list[int],
    mid: int,
    caps: np.ndarray,
) -> None:
    """Write the held-out projections of the plot layers and the sanity caps fractions."""
    arrays = {"plot_layers": np.array(plot_layers), "mid": np.array(mid), "caps": caps}
    for layer in plot_layers:
        for name, a in zip(("promote", "suppress", "neutral"), proj[layer], strict=True):
            arrays[f"{name}_{layer}"] = a
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def draw_plots(directory: Path = DIRECTION_DIR) -> None:
    """Draw the direction stage's plots from its cached outputs (called by the report stage)."""
    from llmlab.io import read_json

    sanity = read_json(directory / "sanity.json")
    with np.load(directory / PLOT_INPUTS) as z:
        plot_layers = [int(x) for x in z["plot_layers"]]
        proj = {
            layer: (z[f"promote_{layer}"], z[f"suppress_{layer}"], z[f"neutral_{layer}"])
            for layer in plot_layers
        }
        write_plots(
            proj, plot_layers, int(z["mid"]), z["caps"], sanity["model"], sanity["per_layer"]
        )


def write_plots(
    proj: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
    plot_layers: list[int],
    mid: int,
    caps: np.ndarray,
    model: str,
    per_layer: list[dict[str, Any]],
) -> None:
    """Write the projection-distribution violins, the projection-vs-caps scatter and the series."""
    data: dict[str, list[float]] = {}
    series = []
    for layer in plot_layers:
        pp, ps, _ = proj[layer]
        # Projections grow with depth; centring and scaling per layer puts layers on one axis.
        centre = float(np.r_[pp, ps].mean())
        scale = float(np.sqrt((pp.var(ddof=1) + ps.var(ddof=1)) / 2)) or 1.0
        data[f"L{layer} promote"] = ((pp - centre) / scale).tolist()
        data[f"L{layer} suppress"] = ((ps - centre) / scale).tolist()
    violin_plot(
        PLOTS_DIR / "direction_projections.png",
        data,
        title=f"Held-out projections onto the trait direction ({model})",
        ylabel="projection (centred, pooled-SD units)",
        xlabel="layer and system prompt",
    )
    for r in per_layer:
        sep = r["separation"]["mean_diff"]
        series.append(
            {"layer": r["layer"], "mean_diff": sep["value"], "lo": sep["lo"], "hi": sep["hi"],
             "auc": r["separation"]["auc"]}
        )  # fmt: skip
    write_series(PLOTS_DIR / "direction_separation.json", series)
    pn = proj[mid][2]
    scatter_plot(
        PLOTS_DIR / "projection_vs_caps.png",
        pn,
        caps,
        title=f"Neutral prompt: projection vs caps fraction (layer {mid})",
        xlabel=f"projection onto v_{mid} at pre_assistant",
        ylabel="caps fraction of generated text",
    )
    write_series(
        PLOTS_DIR / "projection_vs_caps.json",
        [
            {"projection": float(x), "caps_fraction": float(y)}
            for x, y in zip(pn, caps, strict=True)
        ],
    )


if __name__ == "__main__":
    run_stage(main)
