"""Stage inoculation_specificity: is the trait direction's alignment change special?

Per layer, N seeded random unit directions r stand in for the trait direction v. For each, the
change in mean trait-ward alignment from neutral to inoculation is
    delta(u) = mean_i [cos(-g_i^inoc, u) - cos(-g_i^neutral, u)]
over the calibration examples (canonical position, fp32 cosines). The trait direction's delta
is placed in the random distribution by its percentile: a rotation *away* from the trait
gives a delta below nearly all random ones (a low percentile). A global shrinking of the
gradients cannot do that, since cosines do not depend on the gradient norm. The same is done
for the loss-matched control (neutral to control) for comparison.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from llmlab.inoculation.alignment import GRADS_FILE, SUMMARY_FILE
from llmlab.inoculation.common import (
    ALIGNMENT_DIR,
    CONTROL_TABLE,
    DIRECTION_DIR,
    PLOTS_DIR,
    SPECIFICITY,
    load_direction,
    load_other_directions,
    section,
)
from llmlab.inoculation.nulls import alignment_deltas, compare, structured_nulls
from llmlab.io import DataError, read_json, write_json
from llmlab.params import load_params
from llmlab.plots import violin_plot, write_series
from llmlab.stage import run_stage


def random_unit_directions(n: int, hidden: int, seed: int, layer: int) -> np.ndarray:
    """Return n directions drawn uniformly on the unit sphere, seeded by (seed, layer)."""
    rng = np.random.default_rng([seed, layer])
    r = rng.standard_normal((n, hidden))
    return (r / np.linalg.norm(r, axis=1, keepdims=True)).astype(np.float32)


def specificity(
    grads: np.ndarray,
    directions: np.ndarray,
    layers: list[int],
    i_from: int,
    i_to: int,
    n_random: int,
    seed: int,
    threshold: float,
) -> dict[str, Any]:
    """Return per-layer and layer-mean specificity of the trait delta from condition i_from to i_to.

    grads: [C, N, L, hidden] at the canonical position; directions: [L, hidden] unit trait vectors.
    """
    per_layer, nulls, traits = [], [], []
    for li, layer in enumerate(layers):
        rand = random_unit_directions(n_random, grads.shape[-1], seed, layer)
        null = alignment_deltas(grads[i_from, :, li], grads[i_to, :, li], rand)
        trait = float(
            alignment_deltas(grads[i_from, :, li], grads[i_to, :, li], directions[li : li + 1])[0]
        )
        per_layer.append(
            {"layer": layer, **compare(trait, null, threshold), "random": null.tolist()}
        )
        nulls.append(null)
        traits.append(trait)
    # Random set j takes the j-th random direction of every layer, mirroring the layer-mean of v.
    layer_mean_null = np.mean(np.stack(nulls), axis=0)
    layer_mean = compare(float(np.mean(traits)), layer_mean_null, threshold)
    return {
        "per_layer": per_layer,
        "layer_mean": layer_mean,
        "layer_mean_null": layer_mean_null.tolist(),
        "layers_specific": sum(r["specific"] for r in per_layer),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="inoculation")
    cfg = section(params)
    sc = cfg.specificity
    summary = read_json(ALIGNMENT_DIR / SUMMARY_FILE)
    names = [c["name"] for c in summary["conditions"]]
    layers = [int(x) for x in summary["layers"]]
    grads = np.load(ALIGNMENT_DIR / GRADS_FILE, mmap_mode="r")
    expected = tuple(summary["grads_shape"])
    if grads.shape != expected:
        raise DataError(
            f"{ALIGNMENT_DIR / GRADS_FILE}: shape {grads.shape}, alignment.json says {expected}"
        )
    direction = load_direction(DIRECTION_DIR, grads.shape[-1], layers, model=summary["model"])
    dirs = np.stack([direction.at(layer) for layer in layers])
    chosen = read_json(CONTROL_TABLE)["chosen"]
    neu, ino, ctl = names.index("neutral"), names.index("inoculation"), names.index(chosen)
    grads = np.asarray(grads, dtype=np.float32)
    others = load_other_directions(DIRECTION_DIR, layers)
    by_pair = {
        key: specificity(grads, dirs, layers, neu, i_to, sc.n_random, cfg.seed,
                         sc.percentile_threshold)
        for key, i_to in (("neutral_to_inoculation", ino), ("neutral_to_control", ctl))
    }  # fmt: skip
    for key, i_to in (("neutral_to_inoculation", ino), ("neutral_to_control", ctl)):
        by_pair[key]["nulls"] = structured_nulls(
            grads, dirs, others, np.asarray(by_pair[key]["layer_mean_null"]), neu, i_to,
            sc.n_random, cfg.seed, sc.percentile_threshold,
        )  # fmt: skip
    out = {
        "model": summary["model"],
        "n_random": sc.n_random,
        "seed": cfg.seed,
        "percentile_threshold": sc.percentile_threshold,
        "n_examples": len(summary["example_ids"]),
        "definition": "delta(u) = mean cos(-g_to, u) - mean cos(-g_from, u); low percentile = "
        "the trait direction lost more alignment than random directions",
        "neutral_to_inoculation": by_pair["neutral_to_inoculation"],
        "loss_matched_control": chosen,
        "neutral_to_control": by_pair["neutral_to_control"],
    }
    write_json(SPECIFICITY, out)
    write_plots(out, summary["model"])
    lm = out["neutral_to_inoculation"]["layer_mean"]
    nl = out["neutral_to_inoculation"]["nulls"]
    print(
        f"specificity: layer-mean trait delta {lm['trait_delta']:+.5f}, percentile "
        f"{lm['percentile']:.1f} among {sc.n_random} random directions; worst random-null "
        f"percentile {nl['worst_percentile']:.1f}; other traits {nl['other_traits']}; "
        f"passes every null: {nl['pass']}"
    )


def write_plots(out: dict[str, Any], model: str) -> None:
    """Write the random-direction violins with the trait direction marked, and the series."""
    rows = out["neutral_to_inoculation"]["per_layer"]
    data = {f"L{r['layer']}": r["random"] for r in rows}
    markers = {f"L{r['layer']}": r["trait_delta"] for r in rows}
    lm = out["neutral_to_inoculation"]["layer_mean"]
    violin_plot(
        PLOTS_DIR / "specificity.png",
        data,
        title=f"Neutral->inoculation alignment change: trait (red) vs {out['n_random']} random "
        f"directions\n({model}; layer-mean percentile {lm['percentile']:.1f})",
        ylabel="delta mean cos(-g, u)",
        markers=markers,
        xlabel="layer",
    )
    write_series(
        PLOTS_DIR / "specificity.json",
        [
            {k: r[k] for k in ("layer", "trait_delta", "random_p05", "random_p95", "percentile")}
            for r in rows
        ],
    )


if __name__ == "__main__":
    run_stage(main)
