"""Stage inoculation_alignment: gradient alignment with the trait direction for every condition.

For each condition (neutral, inoculation, every control candidate) and each calibration
example, the ALL-CAPS completion is teacher-forced under that condition's system prompt and
one backward pass (parameters frozen) gives g_l = dL/dh_l at the canonical position
(pre_assistant) and the robustness positions. Per example, layer and position it stores the
loss, |g_l|, <g_l, v_l> and cos(g_l, v_l) (fp32), plus the raw canonical-position gradients for
the random-direction control. Summaries report the trait-ward alignment -cos(g_l, v_l)
(see `llmlab.inoculation.common`) with bootstrap CIs over examples.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from llmlab.inoculation.common import (
    ALIGNMENT_DIR,
    DIRECTION_DIR,
    EXAMPLES,
    PLOTS_DIR,
    at_precision,
    calibration_examples,
    conditions,
    conversation,
    load_direction,
    precision,
    read_examples,
    resolve_prompts,
    section,
)
from llmlab.inoculation.config import CANONICAL_POSITION
from llmlab.inoculation.gradalign import encode_targets, measure_alignment
from llmlab.io import DataError, atomic_path, write_json, write_jsonl
from llmlab.layers import resolve_layers
from llmlab.models import load_model
from llmlab.params import load_params
from llmlab.plots import bar_with_ci, line_plot, write_series
from llmlab.stage import run_stage, seed_everything
from llmlab.stats import Estimate, bootstrap_diff, hierarchical_bootstrap, pearson_ci

ARRAYS_FILE = "alignment.npz"
GRADS_FILE = "grads.npy"
SUMMARY_FILE = "alignment.json"


def estimate(values: np.ndarray, ids: list[str], seed: int, n_boot: int = 2000) -> Estimate:
    """Return the mean over examples with a bootstrap CI (examples resampled)."""
    return hierarchical_bootstrap(
        {i: [float(v)] for i, v in zip(ids, values, strict=True)}, n_boot=n_boot, seed=seed
    )


def paired_diff(
    a: np.ndarray, b: np.ndarray, ids: list[str], seed: int, n_boot: int = 2000
) -> Estimate:
    """Return mean(a - b) over the same examples with a paired bootstrap CI."""
    return bootstrap_diff(
        {i: [float(v)] for i, v in zip(ids, a, strict=True)},
        {i: [float(v)] for i, v in zip(ids, b, strict=True)},
        paired=True,
        n_boot=n_boot,
        seed=seed,
    )


def _layer_mean(a: np.ndarray) -> np.ndarray:
    """Return the mean over layers [N, L] -> [N], skipping layers with an undefined cosine."""
    ok = np.isfinite(a)
    n = ok.sum(axis=1)
    return np.where(n > 0, np.where(ok, a, 0.0).sum(axis=1) / np.maximum(n, 1), np.nan)


def loss_shift_halves(shift: np.ndarray, seed: int) -> list[float]:
    """Return the mean per-example loss shift on two disjoint seeded halves of the examples.

    A stable shift has the same sign on both; one that flips is sampling noise.
    """
    order = np.random.default_rng(seed).permutation(len(shift))
    half = len(shift) // 2
    return [float(shift[order[:half]].mean()), float(shift[order[half:]].mean())]


GATE_CONDITIONS = {
    "cosine_computable": "a cosine at pre_assistant is undefined (zero gradient or direction)",
    "alignment_not_noise": "the neutral alignment profile's split-half reliability CI is not above 0",
    "loss_shift_measurable": "the inoculation - neutral loss shift's CI covers 0",
    "loss_shift_stable": "the inoculation - neutral loss shift changes sign between halves",
}


def check_gate(gate: dict[str, Any], override: bool) -> list[str]:
    """Return the failed phase-3 gate conditions; raise naming them unless override is set."""
    failed = [k for k in GATE_CONDITIONS if not gate[k]]
    if failed and not override:
        raise DataError(
            f"{ALIGNMENT_DIR / SUMMARY_FILE}: phase-3 decision gate fails: "
            + "; ".join(f"{k} ({GATE_CONDITIONS[k]})" for k in failed)
            + " (inoculation.alignment.gate_override: true runs on)"
        )
    return failed


def split_half_reliability(align: np.ndarray, seed: int) -> dict[str, Any]:
    """Return Pearson r between the per-layer mean alignment of two random halves of examples.

    align: [N, L]. A profile that is pure noise gives r near 0; a stable one gives r near 1.
    """
    n, n_layers = align.shape
    if n < 4 or n_layers < 4:
        return {"r": None, "reason": f"needs >= 4 examples and >= 4 layers (have {n}, {n_layers})"}
    order = np.random.default_rng(seed).permutation(n)
    a = align[order[: n // 2]].mean(axis=0)
    b = align[order[n // 2 :]].mean(axis=0)
    try:
        return pearson_ci(a, b).to_dict()
    except ValueError as e:
        return {"r": None, "reason": str(e)}


def summarise(
    arrays: dict[str, np.ndarray],
    names: list[str],
    roles: list[str],
    texts: list[str],
    ids: list[str],
    layers: list[int],
    positions: list[str],
    seed: int,
) -> dict[str, Any]:
    """Return per-condition estimates, inoculation-minus-neutral deltas and the phase-3 gate."""
    align = -arrays["cos"]  # trait-ward alignment cos(-g, v), [C, N, L, P]
    canon = positions.index(CANONICAL_POSITION)
    neu, ino = names.index("neutral"), names.index("inoculation")
    out_conditions = []
    for c, name in enumerate(names):
        a = align[c, :, :, canon]
        out_conditions.append(
            {
                "name": name,
                "role": roles[c],
                "text": texts[c],
                "loss": estimate(arrays["loss"][c], ids, seed).to_dict(),
                "loss_minus_neutral": paired_diff(
                    arrays["loss"][c], arrays["loss"][neu], ids, seed
                ).to_dict(),
                "align_layer_mean": estimate(a.mean(axis=1), ids, seed).to_dict(),
                "grad_norm_layer_mean": estimate(
                    arrays["grad_norm"][c, :, :, canon].mean(axis=1), ids, seed
                ).to_dict(),
                "align_by_layer": [
                    {"layer": layer, **estimate(a[:, li], ids, seed).to_dict()}
                    for li, layer in enumerate(layers)
                ],
            }
        )
    deltas = {
        "loss": paired_diff(arrays["loss"][ino], arrays["loss"][neu], ids, seed).to_dict(),
        "align_layer_mean_by_position": {
            pos: paired_diff(
                _layer_mean(align[ino, :, :, p]), _layer_mean(align[neu, :, :, p]), ids, seed
            ).to_dict()
            for p, pos in enumerate(positions)
        },
        "align_by_layer": [
            {
                "layer": layer,
                **paired_diff(
                    align[ino, :, li, canon], align[neu, :, li, canon], ids, seed
                ).to_dict(),
            }
            for li, layer in enumerate(layers)
        ],
        "grad_norm_layer_mean": paired_diff(
            arrays["grad_norm"][ino, :, :, canon].mean(axis=1),
            arrays["grad_norm"][neu, :, :, canon].mean(axis=1),
            ids,
            seed,
        ).to_dict(),
    }
    nonzero = sum(
        1
        for cond in out_conditions
        for row in cond["align_by_layer"]
        if row["lo"] > 0 or row["hi"] < 0
    )
    reliability = split_half_reliability(align[neu, :, :, canon], seed)
    canon_cos = arrays["cos"][:, :, :, canon]
    finite = float(np.isfinite(canon_cos).mean())
    halves = loss_shift_halves(arrays["loss"][ino] - arrays["loss"][neu], seed)
    gate = {
        "cells_with_ci_excluding_zero": nonzero,
        "cells": len(names) * len(layers),
        "finite_cosine_fraction": finite,
        "cosine_computable": finite == 1.0,
        "neutral_split_half_reliability": reliability,
        "alignment_not_noise": bool(reliability.get("r") is not None and reliability["lo"] > 0),
        "loss_shift_measurable": bool(deltas["loss"]["lo"] > 0 or deltas["loss"]["hi"] < 0),
        "loss_shift_halves": halves,
        "loss_shift_stable": bool(halves[0] * halves[1] > 0),
    }
    gate["failed"] = [k for k in GATE_CONDITIONS if not gate[k]]
    return {"conditions": out_conditions, "inoculation_minus_neutral": deltas, "gate": gate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="inoculation")
    cfg = section(params)
    ac = cfg.alignment
    seed_everything(cfg.seed)
    prompts = resolve_prompts(cfg.prompts)
    conds = conditions(prompts)
    calib = calibration_examples(read_examples(EXAMPLES))
    ids = [r["id"] for r in calib]
    loaded = load_model(at_precision(params, ac.fp32))
    layers = resolve_layers(ac.layers, loaded.n_layers)
    direction = load_direction(DIRECTION_DIR, loaded.hidden_size, layers, model=loaded.name)
    dirs = np.stack([direction.at(layer) for layer in layers])
    positions = list(ac.positions)
    results = []
    for cond in conds:
        convs = [conversation(cond.text, r["prompt"], r["caps"]) for r in calib]
        encoded = encode_targets(
            loaded, convs, ids, positions, ac.max_target_tokens, f"{EXAMPLES} example"
        )
        results.append(
            measure_alignment(
                loaded, encoded, layers, positions, dirs, ac.batch_size, CANONICAL_POSITION
            )
        )
        print(f"alignment: {cond.name}: mean loss {results[-1].loss.mean():.4f}")
    arrays = {
        key: np.stack([getattr(r, key) for r in results])
        for key in ("loss", "n_tokens", "dot", "grad_norm", "cos")
    }
    ALIGNMENT_DIR.mkdir(parents=True, exist_ok=True)
    with atomic_path(ALIGNMENT_DIR / ARRAYS_FILE, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    with atomic_path(ALIGNMENT_DIR / GRADS_FILE, suffix=".npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.stack([r.grads for r in results]))
    names = [c.name for c in conds]
    summary = summarise(
        arrays, names, [c.role for c in conds], [c.text for c in conds], ids, layers, positions,
        cfg.seed,
    )  # fmt: skip
    meta = {
        "model": loaded.name,
        "hidden_size": loaded.hidden_size,
        "conditions": names,
        "example_ids": ids,
        "layers": layers,
        "positions": positions,
        "canonical_position": CANONICAL_POSITION,
        "precision": precision(loaded),
        "max_target_tokens": ac.max_target_tokens,
        "arrays": {k: list(v.shape) for k, v in arrays.items()},
        "grads_shape": [len(conds), len(ids), len(layers), loaded.hidden_size],
        "sign_convention": "align = cos(-g, v) = -cos(g, v); g = dL/dh on the CAPS target",
    }
    summary["gate"]["override"] = ac.gate_override
    write_json(ALIGNMENT_DIR / SUMMARY_FILE, {**meta, **summary})
    canon = positions.index(CANONICAL_POSITION)
    write_jsonl(
        ALIGNMENT_DIR / "per_example.jsonl",
        [
            {
                "condition": name,
                "id": ex_id,
                "loss": float(arrays["loss"][c, n]),
                "n_tokens": int(arrays["n_tokens"][c, n]),
                "cos_by_layer": [float(x) for x in arrays["cos"][c, n, :, canon]],
                "grad_norm_by_layer": [float(x) for x in arrays["grad_norm"][c, n, :, canon]],
            }
            for c, name in enumerate(names)
            for n, ex_id in enumerate(ids)
        ],
    )
    # Checked after writing so the figures behind a stop are on disk to read.
    failed = check_gate(summary["gate"], ac.gate_override)
    if failed:
        print(f"alignment: phase-3 gate overridden; failing: {', '.join(failed)}")


def draw_plots() -> None:
    """Draw this stage's plots from its cached alignment.json (called by the report stage)."""
    from llmlab.io import read_json

    summary = read_json(ALIGNMENT_DIR / SUMMARY_FILE)
    write_plots(summary, [int(x) for x in summary["layers"]], summary["model"])


def write_plots(summary: dict[str, Any], layers: list[int], model: str) -> None:
    """Write trait-ward alignment vs layer per condition and mean loss per condition."""
    conds = summary["conditions"]
    series = {c["name"]: [r["value"] for r in c["align_by_layer"]] for c in conds}
    line_plot(
        PLOTS_DIR / "alignment_by_layer.png",
        layers,
        series,
        title=f"Trait-ward gradient alignment at pre_assistant ({model})",
        xlabel="layer",
        ylabel="mean cos(-g_l, v_l)",
        hline=0.0,
    )
    rows = []
    for li, layer in enumerate(layers):
        row: dict[str, Any] = {"layer": layer}
        for c in conds:
            row[c["name"]] = c["align_by_layer"][li]["value"]
        rows.append(row)
    write_series(PLOTS_DIR / "alignment_by_layer.json", rows)
    # Between-example spread dwarfs the prompt effect, so the bars show paired differences.
    others = [c for c in conds if c["name"] != "neutral"]
    neutral = next(c for c in conds if c["name"] == "neutral")
    bar_with_ci(
        PLOTS_DIR / "loss_by_condition.png",
        [c["name"] for c in others],
        {
            "loss - neutral": [
                (
                    c["loss_minus_neutral"]["value"],
                    c["loss_minus_neutral"]["lo"],
                    c["loss_minus_neutral"]["hi"],
                )
                for c in others
            ]
        },
        title=f"CAPS-target loss vs neutral ({neutral['loss']['value']:.3f}), {model}",
        ylabel="mean loss - neutral loss (paired 95% CI)",
    )
    write_series(
        PLOTS_DIR / "loss_by_condition.json",
        [
            {
                "condition": c["name"],
                # The colour of .dvc/plots/grouped_bars_ci.json: the candidates share one.
                "group": c["name"] if c["name"] in ("neutral", "inoculation") else "control",
                "loss": c["loss"]["value"],
                "lo": c["loss"]["lo"],
                "hi": c["loss"]["hi"],
                "minus_neutral": c["loss_minus_neutral"]["value"],
            }
            for c in conds
        ],
    )


if __name__ == "__main__":
    run_stage(main)
