"""Stage preferences_measure_{train,eval}: pairwise choices by active learning, then a random hold-out.

Every pair is asked in both orders; P(i > j) is the mean of the two orders after undoing the
flip. Pairs are chosen by the protocol's active-learning rule until the edge budget is spent
or successive fits agree (rank correlation above the run's convergence threshold). Then
`holdout_pairs` pairs drawn uniformly among the unmeasured ones are asked, for held-out fit
metrics that the near-tie active edges would bias towards chance.

The stage only measures; preferences_fit_<split> fits the utilities, so changing fit params
never re-runs elicitation. The selection fits inside active learning use the fit defaults
(FitSection()) for the same reason.

Resumable: every answered pair-order is appended to <out>.partial/journal.jsonl as it comes,
under a key of what determines an answer (model, prompt, backend, samples, seed); a re-run
with the same key answers journalled pair-orders from the journal, so the same seed replays
the same rounds and a killed run loses at most the batch in flight.

Outputs (data/preferences/measure/<split>/): outcomes.jsonl (active-learning pair-orders:
round, task_a, task_b, p_a, mass, low_mass), holdout.jsonl (the random pairs, same fields) and
measure.json (rounds, stop reason, low-mass counts, throughput).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from llmlab.io import DataError, write_json, write_jsonl
from llmlab.models import LoadedModel, load_model
from llmlab.params import load_params
from llmlab.preferences import common as c
from llmlab.preferences.active import ActiveConfig, edge_budget, run_active, unsampled_pairs
from llmlab.preferences.config import ElicitationSection, FitSection, PreferencesParams
from llmlab.preferences.elicit import (
    Choice,
    ChoiceScorer,
    PairOrder,
    apply_min_mass,
    sample_choices,
)
from llmlab.stage import run_stage, seed_everything

log = logging.getLogger(__name__)
ChoiceFn = Callable[[Sequence[PairOrder]], list[Choice]]


def make_chooser(
    loaded: LoadedModel, el: ElicitationSection, n_samples: int, seed: int
) -> tuple[ChoiceFn, ChoiceScorer | None]:
    """Return a function scoring pair-orders with the configured backend (and the scorer).

    On the logprob backend a pair-order below the minimum A/B mass counts 0.5/0.5.
    """
    if el.backend == "logprobs":
        scorer = ChoiceScorer(
            loaded,
            el.template,
            el.batch_size,
            el.prefix_cache,
            prefix_cache_tokens=el.prefix_cache_tokens,
        )

        def scored(orders: Sequence[PairOrder]) -> list[Choice]:
            return apply_min_mass(scorer.p_first(orders), el.min_mass)

        return scored, scorer
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


class Journal:
    """Answered pair-orders of one measurement run, appended as they come, for resuming.

    Rows are keyed by (task_a, task_b) ids; the run key (what determines an answer) is the
    first line, and a journal under another key is discarded rather than mixed in.
    """

    def __init__(self, path: Path, key: dict[str, object]) -> None:
        self.path = path
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.rows: dict[tuple[str, str], Choice] = {}
        if path.exists():
            lines = path.read_text().splitlines()
            if lines and json.loads(lines[0]).get("key") == self.key:
                for line in lines[1:]:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        break  # the line being written when the run was killed
                    self.rows[(r["task_a"], r["task_b"])] = Choice(r["p_a"], r["mass"])
                log.info("%s: resuming with %d answered pair-orders", path, len(self.rows))
            else:
                log.info("%s: written under other settings; starting afresh", path)
                path.unlink()
        self.resumed = len(self.rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            with open(path, "w") as fh:
                fh.write(json.dumps({"key": self.key}) + "\n")

    def wrap(self, choose: ChoiceFn, names: dict[str, str]) -> ChoiceFn:
        """Return `choose` answering journalled pair-orders from the journal, journalling new ones.

        `names` maps a task prompt to its id. Raw answers are journalled, so the minimum-mass
        rule (applied by `choose`) is applied again on replay.
        """

        def choose_resumable(orders: Sequence[PairOrder]) -> list[Choice]:
            keys = [(names[o.task_a], names[o.task_b]) for o in orders]
            todo = [k for k, key in enumerate(keys) if key not in self.rows]
            if todo:
                fresh = choose([orders[k] for k in todo])
                with open(self.path, "a") as fh:
                    for k, ch in zip(todo, fresh, strict=True):
                        self.rows[keys[k]] = ch
                        a, b = keys[k]
                        fh.write(
                            json.dumps(
                                {"task_a": a, "task_b": b, "p_a": ch.p_first, "mass": ch.mass}
                            )
                            + "\n"
                        )
                    fh.flush()
                    os.fsync(fh.fileno())
            return [self.rows[key] for key in keys]

        return choose_resumable


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
                        "low_mass": ch.low_mass,
                    }
                )
    return out


def random_holdout_pairs(
    n: int, measured: Sequence[tuple[int, int]], k: int, seed: int
) -> list[tuple[int, int]]:
    """Return k pairs drawn uniformly among the pairs of n items not yet measured."""
    if k == 0:
        return []
    rng = np.random.default_rng(seed + 104729)
    seen = {(min(a, b), max(a, b)) for a, b in measured}
    cand = unsampled_pairs(n, seen, max(4 * k, 10_000), rng)
    if len(cand) < k:
        raise DataError(
            f"only {len(cand)} unmeasured pairs are left for {k} random hold-out pairs; "
            "lower holdout_pairs"
        )
    idx = rng.choice(len(cand), size=k, replace=False)
    return [(int(cand[p, 0]), int(cand[p, 1])) for p in sorted(idx)]


def choice_summary(rows: Sequence[dict[str, object]]) -> dict[str, object]:
    """Return the mean P(first shown), mean A/B mass and the low-mass count of pair-order rows."""
    p_a = np.array([r["p_a"] for r in rows], dtype=float)
    mass = np.array([r["mass"] for r in rows], dtype=float)
    low = int(sum(bool(r["low_mass"]) for r in rows))
    return {
        "n_pair_orders": len(rows),
        "mean_p_first": float(p_a.mean()) if len(rows) else None,
        "mean_choice_mass": float(mass.mean()) if len(rows) else None,
        "n_low_mass": low,
        "low_mass_share": low / len(rows) if rows else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--split", choices=("train", "eval"), required=True)
    args = ap.parse_args()
    params = load_params(args.params, family="preferences")
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
    out_dir = c.MEASURE / args.split
    el = cfg.elicitation
    journal = Journal(
        out_dir.with_name(out_dir.name + ".partial") / "journal.jsonl",
        {
            "model": params.model,
            "entry": params.models[params.model].model_dump(mode="json"),
            "template": el.template,
            "backend": el.backend,
            "temperature": el.temperature,
            "max_new_tokens": el.max_new_tokens,
            "n_samples": run.n_samples,
            "seed": seed,
            "prompts": hashlib.sha256("\0".join(pool[i].prompt for i in ids).encode()).hexdigest(),
        },
    )
    loaded = load_model(params)
    choose, scorer = make_chooser(loaded, el, run.n_samples, seed)
    prompts = [pool[i].prompt for i in ids]
    choose = journal.wrap(choose, dict(zip(prompts, ids, strict=True)))
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
        fit_kw=c.fit_kwargs(FitSection(), seed),
    )
    t0 = time.time()
    res = run_active(len(ids), measure, al, seed=seed, log=log.info)
    held_pairs = random_holdout_pairs(len(ids), res.pairs, run.holdout_pairs, seed)
    holdout: list[dict[str, object]] = []
    pair_probabilities(choose, prompts, held_pairs, None, holdout, ids, -1)
    seconds = time.time() - t0
    report = {
        "split": args.split,
        "model": params.model,
        "backend": el.backend,
        "min_mass": el.min_mass if el.backend == "logprobs" else None,
        "n_tasks": len(ids),
        "n_edges": len(res.pairs),
        "edge_budget": budget,
        "n_holdout_pairs": len(held_pairs),
        "rounds": len(res.history),
        "stopped": res.stopped,
        "history": res.history,
        "active": choice_summary(outcomes),
        "holdout": choice_summary(holdout),
        "resumed_pair_orders": journal.resumed,
        "seconds": seconds,
        "pair_orders_per_s": (len(outcomes) + len(holdout)) / max(seconds, 1e-9),
        "forward_tokens": scorer.n_forward_tokens if scorer else None,
        "plan_orders": dict(scorer.plan_orders) if scorer else None,
    }
    write_jsonl(out_dir / "outcomes.jsonl", outcomes)
    write_jsonl(out_dir / "holdout.jsonl", holdout)
    write_json(out_dir / "measure.json", c.clean_json(report))
    shutil.rmtree(journal.path.parent)
    log.info(
        "%s: %d tasks, %d edges and %d random hold-out pairs in %.0fs (%d low-mass pair-orders)",
        args.split,
        len(ids),
        len(res.pairs),
        len(held_pairs),
        seconds,
        report["active"]["n_low_mass"] + report["holdout"]["n_low_mass"],
    )


if __name__ == "__main__":
    run_stage(main)
