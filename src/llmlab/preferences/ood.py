"""Stage preferences_ood: do probes track preferences induced by system prompts?

For every OOD group (ood_plan) each target task, and each of as many off-target tasks (topics
the prompt does not name), is paired with its own `n_comparisons` utility-matched comparison
tasks (measured tasks of other topics, nearest to that task's utility, taken round-robin across
topics for diversity); every pair is asked in both orders with and without the system prompt.
Behavioural delta of a task = mean P(choose it | prompt) - P(choose it | baseline); probe
delta = the headline raw probe's score with the prompt minus without.
Reported: the targeted correlation (one point per group: its target tasks' mean deltas), the
overall correlation (one point per group and task, off-target tasks included), each with
Pearson and Spearman r, CIs and sign agreement, per manipulation kind (targeted), how often
each delta has the intended sign, and specificity (on-target minus off-target absolute delta
per group, behavioural and probe), the competing prompts' flips (ood.competing_flips) and a
per-persona summary. Targets without a measured utility (novel-subject tasks
outside both splits) are matched on the probe's baseline prediction, on the same scale.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmlab.io import DataError, read_json, write_json, write_jsonl
from llmlab.models import load_model
from llmlab.params import load_params
from llmlab.plots import scatter_plot, write_series
from llmlab.preferences import common as c
from llmlab.preferences.config import PreferencesParams
from llmlab.preferences.elicit import PairOrder
from llmlab.preferences.measure import make_chooser
from llmlab.preferences.ood_plan import BASELINE, Group, build_groups
from llmlab.preferences.probe import load_probe
from llmlab.preferences.tasks import Task, load_ood_prompts, load_topics
from llmlab.stage import run_stage, seed_everything
from llmlab.stats import pearson_ci, sign_agreement, spearman_ci

log = logging.getLogger(__name__)


def pick_comparisons(
    target_mu: float, utilities: dict[str, float], pool: dict[str, Task], group: Group, k: int
) -> list[str]:
    """Return k comparison ids near target_mu, one per topic per round, nearest topics first."""
    by_topic: dict[str, list[tuple[float, str]]] = defaultdict(list)
    taken = {*group.exclude_ids, *group.target_ids, *group.off_target_ids}
    for tid, mu in utilities.items():
        t = pool[tid]
        if t.topic in group.exclude_topics or tid in taken:
            continue
        by_topic[t.topic].append((abs(mu - target_mu), tid))
    for v in by_topic.values():
        v.sort()
    out: list[str] = []
    while len(out) < k and any(by_topic.values()):
        heads = sorted((v[0][0], topic) for topic, v in by_topic.items() if v)
        for _gap, topic in heads:
            if len(out) < k:
                out.append(by_topic[topic].pop(0)[1])
    return out


def group_row(g: Group, tasks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return one group's point: mean deltas of its target and off-target tasks, specificity.

    Specificity is the on-target minus the off-target absolute delta: positive when the
    prompt moves what it is about more than what it is not.
    """

    def mean(role: str, key: str) -> float:
        return float(np.mean([r[key] for r in tasks if r["role"] == role]))

    on_b, on_p = mean("target", "behaviour_delta"), mean("target", "probe_delta")
    off_b, off_p = mean("off_target", "behaviour_delta"), mean("off_target", "probe_delta")
    return {
        "group": g.id,
        "prompt": g.prompt.id,
        "kind": g.kind,
        "label": g.label,
        "direction": g.direction,
        "pair_id": g.prompt.pair_id,
        "n_targets": len(g.target_ids),
        "n_off_targets": len(g.off_target_ids),
        "behaviour_delta": on_b,
        "probe_delta": on_p,
        "off_target_behaviour_delta": off_b,
        "off_target_probe_delta": off_p,
        "behaviour_specificity": abs(on_b) - abs(off_b),
        "probe_specificity": abs(on_p) - abs(off_p),
        "p_baseline": mean("target", "p_baseline"),
    }


def competing_flips(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return the competing-prompt analysis: how each topic moves when the prompt flips.

    A competing pair is "love X, hate Y" and its flip "love Y, hate X". Per pair and topic the
    flip delta is the topic's delta under the prompt that loves it minus under the one that
    hates it (expected positive), behavioural and probe; reported with their correlation, sign
    agreement and how often each is positive.
    """
    by_pair: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        if r["kind"] == "competing" and r["pair_id"]:
            by_pair[(r["pair_id"], r["label"])][r["direction"]] = r
    flips = [
        {
            "pair": pair,
            "topic": topic,
            "behaviour_flip": d[1]["behaviour_delta"] - d[-1]["behaviour_delta"],
            "probe_flip": d[1]["probe_delta"] - d[-1]["probe_delta"],
        }
        for (pair, topic), d in sorted(by_pair.items())
        if 1 in d and -1 in d
    ]
    if not flips:
        return {"n": 0, "flips": []}
    beh = [f["behaviour_flip"] for f in flips]
    prb = [f["probe_flip"] for f in flips]
    return {
        **correlation(beh, prb),
        "behaviour_positive": float(np.mean([b > 0 for b in beh])),
        "probe_positive": float(np.mean([p > 0 for p in prb])),
        "flips": flips,
    }


def persona_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return per persona: its topic groups, and how often behaviour and probe move as expected."""
    out = []
    for prompt in sorted({r["prompt"] for r in rows if r["kind"] == "persona"}):
        mine = [r for r in rows if r["prompt"] == prompt]
        dirs = [r["direction"] for r in mine]
        out.append(
            {
                "prompt": prompt,
                "n_topics": len(mine),
                "behaviour_matches_intent": sign_agreement(
                    [r["behaviour_delta"] for r in mine], dirs
                ),
                "probe_matches_intent": sign_agreement([r["probe_delta"] for r in mine], dirs),
                "probe_matches_behaviour": sign_agreement(
                    [r["probe_delta"] for r in mine], [r["behaviour_delta"] for r in mine]
                ),
            }
        )
    return out


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Return Pearson and Spearman r with CIs and sign agreement (None where undefined)."""
    out: dict[str, Any] = {"n": len(x)}
    for name, fn in (("pearson", pearson_ci), ("spearman", spearman_ci)):
        try:
            out[name] = fn(x, y).to_dict()
        except ValueError:
            out[name] = None
    out["sign_agreement"] = sign_agreement(x, y) if len(x) else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="preferences")
    cfg: PreferencesParams = params.section("preferences")
    oc = cfg.ood
    seed_everything(cfg.seed)
    pool = c.load_pool()
    topics = load_topics(c.POOL_TOPICS)
    train_ids, eval_ids = c.split_ids("train"), c.split_ids("eval")
    groups = build_groups(
        load_ood_prompts(oc.prompts), pool, eval_ids, train_ids, oc.n_targets, oc.kinds, cfg.seed
    )
    utilities: dict[str, float] = {}
    for split in ("train", "eval"):
        u = c.load_utilities(c.FIT / split / "utilities.csv", topics)
        utilities.update(zip(u.ids, u.mu.tolist(), strict=True))
    probes = read_json(c.RESULTS / "probes.json")
    probe = load_probe(probes["best_probe"])
    act_dir = c.ACTS / "ood"
    keys = sorted(
        {f"{BASELINE}|{t}" for g in groups for t in (*g.target_ids, *g.off_target_ids)}
        | {f"{g.prompt.id}|{t}" for g in groups for t in (*g.target_ids, *g.off_target_ids)}
    )
    x = c.features(act_dir, probe.layer, keys, "the OOD groups")
    scores = dict(zip(keys, probe.score(x).tolist(), strict=True))

    # (group, role, task, comparisons): every task gets comparisons matched to its own utility.
    plan: list[tuple[Group, str, str, list[str]]] = []
    for g in groups:
        for role, tasks in (("target", g.target_ids), ("off_target", g.off_target_ids)):
            for t in tasks:
                mu = utilities.get(t, scores[f"{BASELINE}|{t}"])
                comps = pick_comparisons(mu, utilities, pool, g, oc.n_comparisons)
                if not comps:
                    raise DataError(f"OOD group {g.id}: no comparison task left for {t}")
                plan.append((g, role, t, comps))
    # All pair-orders of all groups in one scoring call: pairs sharing a prompt prefix batch.
    wanted: dict[tuple[str | None, str, str], None] = {}
    for g, _role, t, comps in plan:
        for k in comps:
            for system in (None, g.prompt.system_prompt):
                wanted[(system, t, k)] = None
    triples = list(wanted)
    orders = []
    for system, t, k in triples:
        orders.append(PairOrder(pool[t].prompt, pool[k].prompt, system))
        orders.append(PairOrder(pool[k].prompt, pool[t].prompt, system))
    loaded = load_model(params)
    choose, _ = make_chooser(loaded, cfg.elicitation, oc.n_samples, cfg.seed + 2)
    log.info("OOD: %d groups, %d pair-orders", len(groups), len(orders))
    choices = choose(orders)
    p_target = {
        tr: 0.5 * (choices[2 * n].p_first + 1.0 - choices[2 * n + 1].p_first)
        for n, tr in enumerate(triples)
    }

    task_rows, outcome_rows = [], []
    for g, role, t, comps in plan:
        deltas = []
        for k in comps:
            base, manip = p_target[(None, t, k)], p_target[(g.prompt.system_prompt, t, k)]
            deltas.append(manip - base)
            outcome_rows.append(
                {
                    "group": g.id,
                    "role": role,
                    "task": t,
                    "comparison": k,
                    "p_baseline": base,
                    "p_prompt": manip,
                }
            )
        task_rows.append(
            {
                "group": g.id,
                "kind": g.kind,
                "role": role,
                "task": t,
                "n_comparisons": len(comps),
                "behaviour_delta": float(np.mean(deltas)),
                "probe_delta": scores[f"{g.prompt.id}|{t}"] - scores[f"{BASELINE}|{t}"],
                "p_baseline": float(
                    np.mean([o["p_baseline"] for o in outcome_rows[-len(comps) :]])
                ),
            }
        )
    rows = [group_row(g, [r for r in task_rows if r["group"] == g.id]) for g in groups]
    beh = [r["behaviour_delta"] for r in rows]
    prb = [r["probe_delta"] for r in rows]
    dirs = [r["direction"] for r in rows]
    result: dict[str, Any] = {
        "model": params.model,
        "probe": probes["best_probe"],
        "layer": probe.layer,
        "n_groups": len(rows),
        "n_pair_orders": len(orders),
        "targeted": correlation(beh, prb),
        "overall": correlation(
            [r["behaviour_delta"] for r in task_rows], [r["probe_delta"] for r in task_rows]
        ),
        "by_kind": {
            kind: correlation(
                [r["behaviour_delta"] for r in rows if r["kind"] == kind],
                [r["probe_delta"] for r in rows if r["kind"] == kind],
            )
            for kind in sorted({r["kind"] for r in rows})
        },
        "behaviour_matches_intent": sign_agreement(beh, dirs),
        "probe_matches_intent": sign_agreement(prb, dirs),
        "specificity": {
            "behaviour": float(np.mean([r["behaviour_specificity"] for r in rows])),
            "probe": float(np.mean([r["probe_specificity"] for r in rows])),
            "behaviour_share_on_target_larger": float(
                np.mean([r["behaviour_specificity"] > 0 for r in rows])
            ),
            "probe_share_on_target_larger": float(
                np.mean([r["probe_specificity"] > 0 for r in rows])
            ),
        },
        "competing": competing_flips(rows),
        "personas": persona_summary(rows),
        "groups": rows,
        "tasks": task_rows,
    }
    write_jsonl(c.RESULTS / "ood_outcomes.jsonl", outcome_rows)
    write_json(c.RESULTS / "ood.json", c.clean_json(result))
    write_series(c.PLOTS / "ood.json", rows)
    scatter_plot(
        c.PLOTS / "ood.png",
        beh,
        prb,
        labels=[r["label"][:10] + ("+" if r["direction"] > 0 else "-") for r in rows],
        title=f"OOD system prompts: probe vs behaviour ({params.model}, L{probe.layer})",
        xlabel="behavioural delta P(choose target)",
        ylabel="probe delta (utility units)",
    )
    if not math.isfinite(sum(beh)):
        log.warning("non-finite behavioural deltas")


if __name__ == "__main__":
    run_stage(main)
