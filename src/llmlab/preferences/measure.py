"""Stage preferences_measure_{train,eval}: pairwise choices, active learning, Thurstonian fit.

Every pair is asked in both orders; P(i > j) is the mean of the two orders after undoing the
flip. Pairs are chosen by the protocol's active-learning rule until the edge budget is spent
or successive fits agree (rank correlation above the run's convergence threshold).
Outputs (data/preferences/measure/<split>/): outcomes.jsonl (one row per pair-order: round,
task_a, task_b, p_a, mass), utilities.csv (task_id, topic, mu, sigma, n_comparisons) and
fit.json (held-out-edge log-loss and accuracy, split-half reliability, rounds, throughput).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from llmlab.io import DataError, write_json, write_jsonl
from llmlab.models import LoadedModel, load_model
from llmlab.params import load_params
from llmlab.preferences import common as c
from llmlab.preferences.active import ActiveConfig, edge_budget, run_active
from llmlab.preferences.config import ElicitationSection, FitSection, PreferencesParams
from llmlab.preferences.elicit import Choice, ChoiceScorer, PairOrder, sample_choices
from llmlab.preferences.thurstonian import (
    Edges,
    edge_metrics,
    fit_thurstonian,
    holdout_split,
    split_half_reliability,
)
from llmlab.stage import run_stage, seed_everything

log = logging.getLogger(__name__)
ChoiceFn = Callable[[Sequence[PairOrder]], list[Choice]]


def fit_kwargs(fit: FitSection, seed: int) -> dict[str, object]:
    """Return keyword arguments of fit_thurstonian from the fit section."""
    return {
        "method": fit.method,
        "max_iter": fit.max_iter,
        "log_sigma_bounds": tuple(fit.log_sigma_bounds),
        "prior": fit.prior,
        "seed": seed,
    }


def make_chooser(
    loaded: LoadedModel, el: ElicitationSection, n_samples: int, seed: int
) -> tuple[ChoiceFn, ChoiceScorer | None]:
    """Return a function scoring pair-orders with the configured backend (and the scorer)."""
    if el.backend == "logprobs":
        scorer = ChoiceScorer(loaded, el.template, el.batch_size, el.prefix_cache)
        return scorer.p_first, scorer
    calls = [0]

    def sampled(orders: Sequence[PairOrder]) -> list[Choice]:
        calls[0] += 1
        return sample_choices(
            loaded,
            el.template,
            orders,
            n_samples,
            temperature=el.temperature,
            max_new_tokens=el.max_new_tokens,
            seed=seed + 7919 * calls[0],
            batch_size=el.batch_size,
        )

    return sampled, None


def pair_probabilities(
    choose: ChoiceFn,
    prompts: Sequence[str],
    pairs: Sequence[tuple[int, int]],
    system: str | None = None,
    sink: list[dict[str, object]] | None = None,
    ids: Sequence[str] | None = None,
    round_no: int = 0,
) -> list[float]:
    """Return P(i > j) per pair from both orders; pair-order rows go to `sink` when given."""
    orders = []
    for i, j in pairs:
        orders.append(PairOrder(prompts[i], prompts[j], system))
        orders.append(PairOrder(prompts[j], prompts[i], system))
    choices = choose(orders)
    out = []
    for k, (i, j) in enumerate(pairs):
        ij, ji = choices[2 * k], choices[2 * k + 1]
        out.append(0.5 * (ij.p_first + (1.0 - ji.p_first)))
        if sink is not None and ids is not None:
            for (a, b), ch in (((i, j), ij), ((j, i), ji)):
                sink.append(
                    {
                        "round": round_no,
                        "task_a": ids[a],
                        "task_b": ids[b],
                        "p_a": ch.p_first,
                        "mass": ch.mass,
                    }
                )
    return out


def summarise_fit(n: int, edges: Edges, cfg: PreferencesParams, seed: int) -> dict[str, object]:
    """Return held-out-edge metrics (fit on the rest) and the split-half reliability."""
    kw = fit_kwargs(cfg.fit, seed)
    out: dict[str, object] = {"baseline_log_loss": math.log(2.0)}
    if len(edges) >= 20:
        keep, held = holdout_split(len(edges), cfg.fit.holdout_frac, seed)
        part = fit_thurstonian(n, edges.subset(keep), **kw)  # type: ignore[arg-type]
        out["heldout"] = edge_metrics(part, edges.subset(held))
        out["reliability"] = split_half_reliability(n, edges, cfg.fit.reliability_splits, **kw)
    else:
        out["heldout"] = None
        out["reliability"] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--split", choices=("train", "eval"), required=True)
    args = ap.parse_args()
    params = load_params(args.params)
    cfg: PreferencesParams = params.section("preferences")
    run = getattr(cfg, args.split)
    pool = c.load_pool()
    ids = c.split_ids(args.split)
    if cfg.tasks.exclude_ids_file:
        c.check_disjoint(
            ids,
            c.read_ids(cfg.tasks.exclude_ids_file),
            str(c.IDS[args.split]),
            cfg.tasks.exclude_ids_file,
        )
    missing = [i for i in ids if i not in pool]
    if missing:
        raise DataError(f"{c.IDS[args.split]}: task {missing[0]} is not in {c.POOL}")
    if len(ids) != run.n_tasks:
        raise DataError(
            f"{c.IDS[args.split]}: {len(ids)} tasks but preferences.{args.split}.n_tasks is "
            f"{run.n_tasks}; re-run preferences_split"
        )
    seed = cfg.seed + (0 if args.split == "train" else 1)
    seed_everything(seed)
    loaded = load_model(params)
    choose, scorer = make_chooser(loaded, cfg.elicitation, run.n_samples, seed)
    prompts = [pool[i].prompt for i in ids]
    outcomes: list[dict[str, object]] = []
    round_no = [0]

    def measure(pairs: list[tuple[int, int]]) -> list[float]:
        p = pair_probabilities(choose, prompts, pairs, None, outcomes, ids, round_no[0])
        round_no[0] += 1
        return p

    budget = edge_budget(len(ids), run.edge_budget)
    al = ActiveConfig(
        batch_size=run.batch_size,
        edge_budget=budget,
        convergence_threshold=run.convergence_threshold,
        fit_kw=fit_kwargs(cfg.fit, seed),
    )
    t0 = time.time()
    res = run_active(len(ids), measure, al, seed=seed, log=log.info)
    seconds = time.time() - t0
    edges = Edges.from_lists([p[0] for p in res.pairs], [p[1] for p in res.pairs], res.probs)
    summary = summarise_fit(len(ids), edges, cfg, seed)
    degree = np.bincount(np.array(res.pairs).ravel(), minlength=len(ids))
    out_dir = c.MEASURE / args.split
    rows = [
        {
            "task_id": t,
            "topic": pool[t].topic,
            "mu": float(m),
            "sigma": float(s),
            "n_comparisons": int(d),
        }
        for t, m, s, d in zip(ids, res.fit.mu, res.fit.sigma, degree, strict=True)
    ]
    p_a = np.array([o["p_a"] for o in outcomes], dtype=float)
    mass = np.array([o["mass"] for o in outcomes], dtype=float)
    report = {
        "split": args.split,
        "model": params.model,
        "backend": cfg.elicitation.backend,
        "n_tasks": len(ids),
        "n_edges": len(edges),
        "edge_budget": budget,
        "n_pair_orders": len(outcomes),
        "rounds": len(res.history),
        "stopped": res.stopped,
        "history": res.history,
        "fit_loss": res.fit.loss,
        "fit_converged": res.fit.converged,
        "mean_p_first": float(p_a.mean()),
        "mean_choice_mass": float(mass.mean()),
        "seconds": seconds,
        "pair_orders_per_s": len(outcomes) / max(seconds, 1e-9),
        "forward_tokens": scorer.n_forward_tokens if scorer else None,
        **summary,
    }
    write_jsonl(Path(out_dir) / "outcomes.jsonl", outcomes)
    c.write_utilities(Path(out_dir) / "utilities.csv", rows)
    write_json(Path(out_dir) / "fit.json", c.clean_json(report))
    log.info(
        "%s: %d tasks, %d edges in %.0fs; held-out %s",
        args.split,
        len(ids),
        len(edges),
        seconds,
        summary["heldout"],
    )


if __name__ == "__main__":
    run_stage(main)
