"""Stage foundation_report: per-layer activation norms and a linear probe for prompt kind.

The probe (logistic regression, 5-fold cross-validation) tells math word problems from
everyday instructions; a label-shuffled probe beside it is the chance control.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from llmlab.activations import load_activations, read_index
from llmlab.headline import write_headline
from llmlab.io import DataError, read_jsonl
from llmlab.params import load_params
from llmlab.plots import line_plot, write_series
from llmlab.stage import run_stage


def probe_accuracy(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Return the mean 5-fold cross-validated accuracy of a standardised logistic probe."""
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    return float(cross_val_score(probe, x, y, cv=folds).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prompts", default="data/foundation/prompts.jsonl")
    ap.add_argument("--acts", default="data/foundation/activations")
    ap.add_argument("--metrics", default="metrics/foundation.json")
    ap.add_argument("--series", default="plots/foundation/layers.json")
    ap.add_argument("--plot", default="plots/foundation/layers.png")
    args = ap.parse_args()
    params = load_params(args.params, family="foundation")
    cfg = params.section("foundation")
    rows = read_jsonl(args.prompts, required=("id", "kind"), id_field="id")
    kinds = {r["id"]: r["kind"] for r in rows}
    index = read_index(args.acts)
    if set(index["ids"]) != set(kinds):
        raise DataError(f"{args.acts}: activation ids do not match {args.prompts}")
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for layer in index["layers"]:
        acts = load_activations(args.acts, layer)
        x = np.asarray(acts.values, dtype=np.float64)
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x).all(axis=1)).sum())
            raise DataError(
                f"{args.acts}/layer_{layer:03d}.npy: {bad} row(s) hold non-finite values"
            )
        y = np.array([kinds[i] == "math" for i in acts.ids])
        rows.append(
            {
                "layer": layer,
                "mean_norm": float(np.linalg.norm(x, axis=1).mean()),
                "probe_accuracy": probe_accuracy(x, y, cfg.seed),
                "shuffled_probe_accuracy": probe_accuracy(x, rng.permutation(y), cfg.seed),
            }
        )
    best = max(rows, key=lambda r: r["probe_accuracy"])
    # Headline only: the per-layer numbers are the plot series beside it, and the model and
    # position are params, so every metric here is one numeric `dvc exp show` column.
    write_headline(
        args.metrics,
        {
            "n_prompts": len(kinds),
            "best_layer": best["layer"],
            "best_probe_accuracy": best["probe_accuracy"],
            "best_layer_shuffled_probe_accuracy": best["shuffled_probe_accuracy"],
        },
    )
    write_series(args.series, rows)
    line_plot(
        args.plot,
        [r["layer"] for r in rows],
        {
            "probe accuracy (math vs instruction)": [r["probe_accuracy"] for r in rows],
            "shuffled-label control": [r["shuffled_probe_accuracy"] for r in rows],
        },
        title=f"Prompt-kind probe by layer ({params.model}, {index['position']})",
        xlabel="layer",
        ylabel="5-fold CV accuracy",
        hline=0.5,
    )


if __name__ == "__main__":
    run_stage(main, gpus=0)
