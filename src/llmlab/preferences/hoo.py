"""Stage preferences_hoo: held-one-topic-out generalisation, with content baselines.

Every topic is one fold: the probe trains on the train-run tasks of all other topics and
predicts the held-out topic's utilities (Pearson r and pairwise accuracy within the topic).
Alpha is chosen by the closed-form leave-one-out error on the fold's training rows (sklearn's
RidgeCV after standardising), and the same leave-one-out predictions give the in-distribution r,
so no training task is held back.
Features with identical splits and targets: the model's activations, its base model's
activations (captured at the same token position) and all-MiniLM-L6-v2 sentence embeddings.
Per feature set the layer is chosen by mean in-distribution r. Output: per-fold held-out r and
accuracy, their means over folds weighted by fold size with bootstrap CIs (folds resampled),
and the bar chart instruct vs base vs content.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from llmlab.activations import INDEX_FILE, read_index
from llmlab.io import DataError, write_json
from llmlab.params import load_params
from llmlab.plots import bar_with_ci, write_series
from llmlab.preferences import common as c
from llmlab.preferences.config import PreferencesParams
from llmlab.preferences.probe import alpha_grid
from llmlab.preferences.probes import safe_r
from llmlab.preferences.tasks import load_topic_names, load_topics
from llmlab.stage import run_stage
from llmlab.stats import hierarchical_bootstrap, pairwise_accuracy, pearson_ci


@dataclass(frozen=True)
class Fold:
    """One held-out topic: row indices of its tasks and of the training tasks (every other topic)."""

    topic: str
    held: np.ndarray
    fit: np.ndarray


def make_folds(topics: list[str], fold_topics: list[str], min_size: int, where: str) -> list[Fold]:
    """Return one Fold per topic; DataError naming an empty or too-small fold."""
    arr = np.array(topics)
    folds = []
    for t in fold_topics:
        held = np.flatnonzero(arr == t)
        rest = np.flatnonzero(arr != t)
        if held.size < min_size:
            raise DataError(
                f"{where}: HOO fold {t!r} has {held.size} task(s), needs at least {min_size} "
                "(raise preferences.train.n_tasks or list the folds in preferences.hoo.topics)"
            )
        if rest.size < 6:
            raise DataError(f"{where}: HOO fold {t!r} leaves {rest.size} training task(s)")
        folds.append(Fold(t, held, rest))
    return folds


def safe_acc(pred: np.ndarray, y: np.ndarray) -> float:
    """Return the pairwise accuracy of pred against y, NaN when no pair has distinct targets."""
    try:
        return pairwise_accuracy(pred, y)
    except ValueError:
        return math.nan


@dataclass(frozen=True)
class FoldProbe:
    """A fold's ridge probe: alpha chosen by leave-one-out error, and its LOO predictions."""

    model: Pipeline
    alpha: float
    loo: np.ndarray  # leave-one-out prediction of every training row at `alpha`


def fit_loo_ridge(x: np.ndarray, y: np.ndarray, alphas: list[float]) -> FoldProbe:
    """Return the standardised ridge with the smallest closed-form leave-one-out error.

    sklearn's RidgeCV with gcv_mode="svd" takes one SVD of the centred, standardised design
    for the whole alpha path and computes the exact leave-one-out residuals (intercept
    unpenalised); scoring by MSE stores the LOO predictions themselves. As in the closed
    form, the scaler stays fitted on all rows (its effect on a left-out row is of order 1/n).
    """
    if x.shape[0] < 3:
        raise ValueError(f"a probe needs at least 3 training rows, got {x.shape[0]}")
    x = np.asarray(x, dtype=np.float64)  # float16/32 captures: standardise in float64 too
    ridge = RidgeCV(
        alphas=alphas,
        gcv_mode="svd",
        scoring="neg_mean_squared_error",
        store_cv_results=True,
    )
    model = make_pipeline(StandardScaler(), ridge).fit(x, y)
    alpha = float(ridge.alpha_)
    loo = ridge.cv_results_[:, int(np.flatnonzero(np.asarray(alphas) == alpha)[0])]
    return FoldProbe(model, alpha, np.asarray(loo, dtype=np.float64))


def run_features(
    x: np.ndarray, y: np.ndarray, folds: list[Fold], alphas: list[float]
) -> list[dict[str, Any]]:
    """Return per-fold held-out r and accuracy and in-distribution r for one feature matrix."""
    out = []
    for f in folds:
        probe = fit_loo_ridge(x[f.fit], y[f.fit], alphas)
        held = probe.model.predict(np.asarray(x[f.held], dtype=np.float64))
        out.append(
            {
                "topic": f.topic,
                "n_held": int(f.held.size),
                "n_fit": int(f.fit.size),
                "alpha": probe.alpha,
                "held_r": safe_r(held, y[f.held]),
                "held_acc": safe_acc(held, y[f.held]),
                "in_dist_r": safe_r(probe.loo, y[f.fit]),
                "_pred": held,
            }
        )
    return out


def summarise(
    rows: list[dict[str, Any]], y: np.ndarray, folds: list[Fold], n_boot: int, seed: int
) -> dict[str, Any]:
    """Return mean held-out and in-dist r (bootstrap CIs over folds) and per-fold CIs."""
    per_fold = []
    for r, f in zip(rows, folds, strict=True):
        d = {k: v for k, v in r.items() if not k.startswith("_")}
        try:
            ci = pearson_ci(r["_pred"], y[f.held])
            d.update(held_lo=ci.lo, held_hi=ci.hi)
        except ValueError:
            d.update(held_lo=None, held_hi=None)
        per_fold.append(d)
    out: dict[str, Any] = {"folds": per_fold}
    for key in ("held_r", "held_acc", "in_dist_r"):
        # A fold's value repeated once per held-out task: the pooled mean is the mean over
        # folds weighted by fold size, and the bootstrap resamples folds with their weights
        # (resampling identical copies inside a fold changes nothing).
        vals = {r["topic"]: [r[key]] * r["n_held"] for r in rows if not math.isnan(r[key])}
        if vals:
            est = hierarchical_bootstrap(vals, n_boot=n_boot, seed=seed)
            out[f"mean_{key}"] = {
                "value": est.value,
                "lo": est.lo,
                "hi": est.hi,
                "n_folds": est.n_groups,
                "unweighted": float(np.mean([v[0] for v in vals.values()])),
            }
        else:
            out[f"mean_{key}"] = None
    return out


def feature_sets(cfg: PreferencesParams, model: str) -> list[tuple[str, str, Path]]:
    """Return (key, label, directory) of the available feature sets."""
    out = [("instruct", model, c.ACTS / "instruct")]
    for key, d in (("base", c.ACTS / "base"), ("content", c.ACTS / "minilm")):
        if (d / INDEX_FILE).is_file():
            out.append((key, str(read_index(d)["model"]), d))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="preferences")
    cfg: PreferencesParams = params.section("preferences")
    hc = cfg.hoo
    tr = c.load_utilities(c.FIT / "train" / "utilities.csv", load_topics(c.POOL_TOPICS))
    names = load_topic_names(c.POOL_TOPICS)
    fold_topics = hc.topics or names
    unknown = [t for t in fold_topics if t not in names]
    if unknown:
        raise DataError(
            f"preferences.hoo.topics: topic {unknown[0]!r} is missing from {c.POOL_TOPICS}"
        )
    folds = make_folds(tr.topics, fold_topics, hc.min_fold_size, tr.path)
    alphas = alpha_grid(cfg.probes.alpha_min, cfg.probes.alpha_max, cfg.probes.alpha_sweep_size)
    sets = feature_sets(cfg, params.model)
    # Load every feature matrix first: an index mismatch stops the stage before any output.
    mats = {
        (key, layer): c.features(d, layer, tr.ids, f"train utilities {tr.path}")
        for key, _label, d in sets
        for layer in c.captured_layers(d)
    }
    results: dict[str, Any] = {"model": params.model, "n_train": len(tr.ids), "feature_sets": {}}
    for key, label, d in sets:
        by_layer = {}
        for layer in c.captured_layers(d):
            rows = run_features(mats[(key, layer)], tr.mu, folds, alphas)
            by_layer[layer] = rows
        layer_means = {
            layer: float(np.nanmean([r["in_dist_r"] for r in rows]))
            for layer, rows in by_layer.items()
        }
        best = max(layer_means, key=lambda k: -9 if math.isnan(layer_means[k]) else layer_means[k])
        summary = summarise(by_layer[best], tr.mu, folds, cfg.probes.n_boot, cfg.seed)
        summary.update(
            label=label,
            layer=best,
            layers={
                str(layer): {
                    "mean_in_dist_r": layer_means[layer],
                    "mean_held_r": float(np.nanmean([r["held_r"] for r in rows])),
                    "mean_held_acc": float(np.nanmean([r["held_acc"] for r in rows])),
                }
                for layer, rows in by_layer.items()
            },
        )
        results["feature_sets"][key] = summary
    write_json(c.RESULTS / "hoo.json", c.clean_json(results))
    _plot(results, [f.topic for f in folds])


def _plot(results: dict[str, Any], topics: list[str]) -> None:
    groups = [*topics, "mean"]
    series: dict[str, list[tuple[float, float, float]]] = {}
    rows = []
    for key, s in results["feature_sets"].items():
        vals = []
        for f in s["folds"]:
            lo = f["held_lo"] if f["held_lo"] is not None else math.nan
            hi = f["held_hi"] if f["held_hi"] is not None else math.nan
            vals.append((f["held_r"] if f["held_r"] is not None else math.nan, lo, hi))
            # `group` is the colour of .dvc/plots/grouped_bars_ci.json; lo/hi its error bar.
            rows.append(
                {
                    "feature_set": key,
                    "group": f"{key} ({s['label']})",
                    "topic": f["topic"],
                    "held_r": f["held_r"],
                    "lo": f["held_lo"],
                    "hi": f["held_hi"],
                    "in_dist_r": f["in_dist_r"],
                }
            )
        m = s["mean_held_r"] or {}
        vals.append((m["value"], m["lo"], m["hi"]) if m else (math.nan, math.nan, math.nan))
        rows.append(
            {
                "feature_set": key,
                "group": f"{key} ({s['label']})",
                "topic": "mean",
                "held_r": m.get("value"),
                "lo": m.get("lo"),
                "hi": m.get("hi"),
                # The same keys as the fold rows: DVC drops a plot whose rows add fields.
                "in_dist_r": (s["mean_in_dist_r"] or {}).get("value"),
            }
        )
        series[f"{key}: {s['label']} (L{s['layer']})"] = vals
    bar_with_ci(
        c.PLOTS / "hoo.png",
        groups,
        series,
        title="Held-one-topic-out probe generalisation",
        ylabel="held-out Pearson r",
        xlabel="held-out topic",
        ylim=(-1.0, 1.0),
    )
    write_series(c.PLOTS / "hoo.json", rows)


if __name__ == "__main__":
    run_stage(main)
