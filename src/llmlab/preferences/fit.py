"""Stage preferences_fit_{train,eval}: Thurstonian utilities from a measurement run, and fit metrics.

Reads data/preferences/measure/<split>/ (the elicitation is never re-run here) and writes
data/preferences/fit/<split>/: utilities.csv (task_id, topic, mu, sigma, n_comparisons) and
fit.json with each accuracy named by what it measures:

- `random_pair_accuracy`, `random_pair_log_loss`: the fit (on every active edge) scored on the
  random hold-out pairs, drawn uniformly apart from the active edges; the unbiased held-out check.
- `active_heldout_edge_accuracy`, `active_heldout_edge_log_loss`: the protocol's 5% of the
  active edges held out and predicted by a fit on the rest. Active learning picks near-ties, so
  these sit near chance even for a good fit; kept for comparison with the protocol.
- `sample_agreement`: the paper's accuracy, the share of measured choices (per sample, both
  orders) that pick the fit's preferred task, over the active edges the fit was trained on. On
  the logprob backend a pair-order's P(first) is its expected per-sample agreement.
- `split_half_reliability`: Spearman-Brown split-half correlation of mu (the noise ceiling).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmlab.io import DataError, read_json, write_json
from llmlab.params import load_params
from llmlab.preferences import common as c
from llmlab.preferences.config import PreferencesParams
from llmlab.preferences.thurstonian import (
    Fit,
    edge_metrics,
    fit_thurstonian,
    holdout_split,
    split_half_reliability,
)
from llmlab.stage import run_stage, seed_everything

log = logging.getLogger(__name__)


def sample_agreement(fit: Fit, rows: Sequence[dict[str, object]], where: dict[str, int]) -> float:
    """Return the mean share of samples per pair-order that choose the fit's preferred task.

    Pair-orders whose tasks the fit ranks equal have no preferred task and are skipped.
    """
    agree = []
    for r in rows:
        i, j = where[str(r["task_a"])], where[str(r["task_b"])]
        q = float(fit.prob(np.array([i]), np.array([j]))[0])
        if q == 0.5:
            continue
        p = float(r["p_a"])  # type: ignore[arg-type]
        agree.append(p if q > 0.5 else 1.0 - p)
    return float(np.mean(agree)) if agree else math.nan


def fit_report(
    ids: Sequence[str],
    outcomes: Sequence[dict[str, object]],
    holdout: Sequence[dict[str, object]],
    cfg: PreferencesParams,
    seed: int,
    outcomes_path: Path,
    holdout_path: Path,
) -> tuple[Fit, dict[str, object]]:
    """Return the fit on every active edge and its metrics (see the module docstring)."""
    kw = c.fit_kwargs(cfg.fit, seed)
    n = len(ids)
    where = {t: k for k, t in enumerate(ids)}
    edges = c.edges_from_rows(outcomes, ids, outcomes_path)
    fit = fit_thurstonian(n, edges, **kw)  # type: ignore[arg-type]
    out: dict[str, object] = {
        "n_tasks": n,
        "n_edges": len(edges),
        "fit_loss": fit.loss,
        "fit_converged": fit.converged,
        "baseline_log_loss": math.log(2.0),
        "sample_agreement": sample_agreement(fit, outcomes, where),
        "n_random_pairs": 0,
        "random_pair_accuracy": None,
        "random_pair_log_loss": None,
        "active_heldout_edge_accuracy": None,
        "active_heldout_edge_log_loss": None,
        "split_half_reliability": None,
    }
    if holdout:
        held = edge_metrics(fit, c.edges_from_rows(holdout, ids, holdout_path))
        out["n_random_pairs"] = held["n_edges"]
        out["random_pair_accuracy"] = held["accuracy"]
        out["random_pair_log_loss"] = held["log_loss"]
    if len(edges) >= 20:
        keep, held_mask = holdout_split(len(edges), cfg.fit.holdout_frac, seed)
        part = fit_thurstonian(n, edges.subset(keep), **kw)  # type: ignore[arg-type]
        held = edge_metrics(part, edges.subset(held_mask))
        out["active_heldout_edge_accuracy"] = held["accuracy"]
        out["active_heldout_edge_log_loss"] = held["log_loss"]
        out["split_half_reliability"] = split_half_reliability(
            n, edges, cfg.fit.reliability_splits, **kw
        )
    return fit, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--split", choices=("train", "eval"), required=True)
    args = ap.parse_args()
    params = load_params(args.params, family="preferences")
    cfg: PreferencesParams = params.section("preferences")
    seed = cfg.seed + (0 if args.split == "train" else 1)
    seed_everything(seed)
    pool = c.load_pool()
    ids = c.split_ids(args.split)
    src = c.MEASURE / args.split
    measured = read_json(src / "measure.json")
    if measured.get("n_tasks") != len(ids):
        raise DataError(
            f"{src / 'measure.json'}: n_tasks {measured.get('n_tasks')} but {c.IDS[args.split]} "
            f"has {len(ids)}; re-run preferences_measure_{args.split}"
        )
    outcomes = c.read_outcomes(src / "outcomes.jsonl")
    holdout = c.read_outcomes(src / "holdout.jsonl")
    fit, report = fit_report(
        ids, outcomes, holdout, cfg, seed, src / "outcomes.jsonl", src / "holdout.jsonl"
    )
    where = {t: k for k, t in enumerate(ids)}
    degree = np.zeros(len(ids), dtype=int)
    for r in outcomes:
        degree[where[str(r["task_a"])]] += 1
        degree[where[str(r["task_b"])]] += 1
    rows = [
        {
            "task_id": t,
            "topic": pool[t].topic,
            "mu": float(m),
            "sigma": float(s),
            "n_comparisons": int(d) // 2,  # both orders of a pair are one comparison
        }
        for t, m, s, d in zip(ids, fit.mu, fit.sigma, degree, strict=True)
    ]
    out_dir = c.FIT / args.split
    report = {
        "split": args.split,
        "model": measured["model"],
        "backend": measured["backend"],
        "rounds": measured["rounds"],
        "stopped": measured["stopped"],
        "mean_p_first": measured["active"]["mean_p_first"],
        "mean_choice_mass": measured["active"]["mean_choice_mass"],
        "n_low_mass": measured["active"]["n_low_mass"] + measured["holdout"]["n_low_mass"],
        "low_mass_share": measured["active"]["low_mass_share"],
        "seconds": measured["seconds"],
        **report,
    }
    c.write_utilities(out_dir / "utilities.csv", rows)
    write_json(out_dir / "fit.json", c.clean_json(report))
    log.info(
        "%s: %d edges; random-pair accuracy %s, sample agreement %.3f",
        args.split,
        report["n_edges"],
        report["random_pair_accuracy"],
        report["sample_agreement"],
    )


if __name__ == "__main__":
    run_stage(main)
