"""Stage preferences_probes: Ridge probes from activations to Thurstonian utilities.

Per captured layer and target variant (raw mu; topic-demeaned mu): standardised Ridge fitted on
the train utilities; alpha chosen by Pearson r on a seeded half of the eval tasks (the sweep
half) and the probe scored on the other half (the score half). Scores: Pearson r with its
Fisher CI, pairwise accuracy over all score-half pairs, and (raw) accuracy on the measured eval
edges inside the score half. Beside them the noise ceilings: sqrt of the eval run's split-half
reliability for r, and the Thurstonian fit's own accuracy on the same edges. A probe trained
on shuffled train targets goes through the same procedure as the chance control. The
headline layer is the one with the best sweep-half r (never chosen on the score half).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np

from llmlab.io import DataError, read_json, write_json
from llmlab.params import load_params
from llmlab.plots import line_plot, write_series
from llmlab.preferences import common as c
from llmlab.preferences.config import PreferencesParams
from llmlab.preferences.probe import RidgePath, alpha_grid, save_probe
from llmlab.preferences.tasks import load_topics
from llmlab.preferences.thurstonian import Edges
from llmlab.stage import run_stage
from llmlab.stats import pairwise_accuracy, pearson_ci, proportion_ci

VARIANTS = ("raw", "topic_demeaned")


def safe_r(x: np.ndarray, y: np.ndarray) -> float:
    """Return Pearson r, or NaN when undefined (constant input, fewer than 3 points)."""
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def eval_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (sweep, score) index arrays: a seeded random half of range(n) and the rest."""
    perm = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


def edge_accuracy(pred: np.ndarray, edges: Edges, keep: np.ndarray) -> tuple[int, int]:
    """Return (correct, decided) over edges with both ends in `keep` and P != 0.5."""
    inside = np.isin(edges.i, keep) & np.isin(edges.j, keep) & (edges.p != 0.5)
    i, j, p = edges.i[inside], edges.j[inside], edges.p[inside]
    return int(np.sum((pred[i] > pred[j]) == (p > 0.5))), int(inside.sum())


def sweep(
    path: RidgePath, x_ev: np.ndarray, y_ev: np.ndarray, alphas: list[float], sw: np.ndarray
) -> tuple[float, float, np.ndarray]:
    """Return (best alpha, its sweep-half r, eval predictions at it)."""
    best = (alphas[0], -math.inf, path.predict(x_ev, alphas[0]))
    for a in alphas:
        pred = path.predict(x_ev, a)
        r = safe_r(pred[sw], y_ev[sw])
        if not math.isnan(r) and r > best[1]:
            best = (a, r, pred)
    return best


def score_half(pred: np.ndarray, y: np.ndarray, sc: np.ndarray) -> dict[str, Any]:
    """Return r (with CI) and all-pairs accuracy on the score half."""
    out: dict[str, Any] = {"n_score": int(sc.size)}
    try:
        ci = pearson_ci(pred[sc], y[sc])
        out.update(r=ci.r, r_lo=ci.lo, r_hi=ci.hi)
    except ValueError:
        out.update(r=safe_r(pred[sc], y[sc]), r_lo=None, r_hi=None)
    try:
        out["pairwise_acc"] = pairwise_accuracy(pred[sc], y[sc])
    except ValueError:
        out["pairwise_acc"] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="preferences")
    cfg: PreferencesParams = params.section("preferences")
    pc = cfg.probes
    topics = load_topics(c.POOL_TOPICS)
    tr = c.load_utilities(c.FIT / "train" / "utilities.csv", topics)
    ev = c.load_utilities(c.FIT / "eval" / "utilities.csv", topics)
    c.check_disjoint(tr.ids, ev.ids, tr.path, ev.path)
    edges = c.load_edges(c.MEASURE / "eval" / "outcomes.jsonl", ev.ids)
    eval_fit = read_json(c.FIT / "eval" / "fit.json")
    rel = eval_fit.get("split_half_reliability")
    r_ceiling = math.sqrt(rel) if isinstance(rel, float) and rel > 0 else None
    act_dir = c.ACTS / "instruct"
    layers = c.captured_layers(act_dir)
    sw, sc = eval_halves(len(ev.ids), pc.eval_split_seed)
    if min(sw.size, sc.size) < 4:
        raise DataError(f"{ev.path}: {len(ev.ids)} eval tasks are too few for two halves of 4+")
    mu_correct, mu_decided = edge_accuracy(ev.mu, edges, sc)
    alphas = alpha_grid(pc.alpha_min, pc.alpha_max, pc.alpha_sweep_size)
    targets = {
        "raw": (tr.mu, ev.mu),
        "topic_demeaned": (tr.topic_demeaned(), ev.topic_demeaned()),
    }
    rng = np.random.default_rng(cfg.seed)
    rows: list[dict[str, Any]] = []
    # Check every layer's index before anything is written: nothing half-done on bad input.
    feats = {
        layer: (
            c.features(act_dir, layer, tr.ids, f"train utilities {tr.path}"),
            c.features(act_dir, layer, ev.ids, f"eval utilities {ev.path}"),
        )
        for layer in layers
    }
    probes = []
    for layer, (x_tr, x_ev) in feats.items():
        features = RidgePath(x_tr, targets["raw"][0])  # one SVD per layer, for every target
        for variant in VARIANTS:
            y_tr, y_ev = targets[variant]
            path = features.with_target(y_tr)
            alpha, r_sweep, pred = sweep(path, x_ev, y_ev, alphas, sw)
            row = {"layer": layer, "variant": variant, "alpha": alpha, "r_sweep": r_sweep}
            row.update(score_half(pred, y_ev, sc))
            if variant == "raw":
                k, n = edge_accuracy(pred, edges, sc)
                row.update(edge_acc=k / n if n else None, n_edges=n)
            shuf = features.with_target(rng.permutation(y_tr))
            _, _, spred = sweep(shuf, x_ev, y_ev, alphas, sw)
            row["shuffled_r"] = safe_r(spred[sc], y_ev[sc])
            rows.append(row)
            probes.append(
                (variant, layer, path.probe(alpha, layer, variant, params.model, r_sweep=r_sweep))
            )
    for variant, layer, probe in probes:
        save_probe(c.PROBES / f"{variant}_L{layer:03d}.safetensors", probe)
    best = {}
    for variant in VARIANTS:
        cand = [r for r in rows if r["variant"] == variant]
        best[variant] = max(cand, key=lambda r: r["r_sweep"] if r["r_sweep"] > -math.inf else -9)
    head = best["raw"]
    edge_ci = (
        proportion_ci(round(head["edge_acc"] * head["n_edges"]), head["n_edges"]).to_dict()
        if head.get("n_edges")
        else None
    )
    result = {
        "model": params.model,
        "n_train": len(tr.ids),
        "n_eval": len(ev.ids),
        "n_sweep": int(sw.size),
        "n_score": int(sc.size),
        "alphas": alphas,
        "best_layer": head["layer"],
        "best_probe": str(c.PROBES / f"raw_L{head['layer']:03d}.safetensors"),
        "headline": {
            "raw": best["raw"],
            "topic_demeaned": best["topic_demeaned"],
            "edge_acc_ci": edge_ci,
            "ceiling_r": r_ceiling,
            "ceiling_edge_acc": mu_correct / mu_decided if mu_decided else None,
            "eval_reliability": rel,
        },
        "layers": rows,
    }
    write_json(c.RESULTS / "probes.json", c.clean_json(result))
    write_series(c.PLOTS / "probes_layers.json", _plot_rows(rows))
    series = {f"{v} r": [r["r"] for r in rows if r["variant"] == v] for v in VARIANTS}
    series["shuffled-target r"] = [r["shuffled_r"] for r in rows if r["variant"] == "raw"]
    line_plot(
        c.PLOTS / "probes_layers.png",
        layers,
        series,
        title=f"Utility probes by layer ({params.model}, score half of eval)",
        xlabel="layer",
        ylabel="Pearson r with eval utilities",
        hline=r_ceiling,
    )


def _plot_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        d = out.setdefault(r["layer"], {"layer": r["layer"]})
        d[f"{r['variant']}_r"] = r["r"]
        if r["variant"] == "raw":
            d["shuffled_r"] = r["shuffled_r"]
            d["raw_pairwise_acc"] = r["pairwise_acc"]
    return list(out.values())


if __name__ == "__main__":
    run_stage(main)
