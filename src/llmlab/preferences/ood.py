"""Stage preferences_ood: do probes track preferences induced by system prompts?

For every OOD group (ood_plan) each target task, and each of as many off-target tasks (topics
the prompt does not name), is paired with its own `n_comparisons` utility-matched comparison
tasks (measured tasks of other topics, nearest to that task's utility, taken round-robin across
topics for diversity); every pair is asked in both orders with and without the system prompt.
Behavioural delta of a task = mean P(choose it | prompt) - P(choose it | baseline); probe
delta = a raw probe's score with the prompt minus without.
The system prompts are split (ood_holdout) into selection prompts, which choose the probe
layer, and held-out prompts, which give the reported numbers; each set is analysed apart.
Reported per set: the targeted correlation (one point per group: its target tasks' mean
deltas), the overall correlation (one point per group and task, off-target tasks included),
each with Pearson and Spearman r, CIs and sign agreement, per manipulation kind (targeted), how
often each delta has the intended sign, and specificity (on-target minus off-target absolute
delta per group, behavioural and probe), the competing prompts' flips (ood.competing_flips) and
a per-persona summary. Targets without a measured utility (novel-subject tasks outside both
splits) are matched on the probes stage's baseline prediction, on the same scale.
Only cached outputs, so a pushed run-cache restores this stage elsewhere; the plot is drawn
by preferences_report.
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
from llmlab.preferences import common as c
from llmlab.preferences.config import PreferencesParams
from llmlab.preferences.elicit import PairOrder
from llmlab.preferences.measure import make_chooser
from llmlab.preferences.ood_holdout import HELDOUT, SELECT, choose_layer, split_prompts
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
    # Comparisons of tasks without a measured utility are matched on the probes stage's probe
    # (chosen on preference data), so the behavioural measurement is fixed before any choice.
    match_probe = load_probe(probes["best_probe"])
    act_dir = c.ACTS / "ood"
    keys = sorted(
        {f"{BASELINE}|{t}" for g in groups for t in (*g.target_ids, *g.off_target_ids)}
        | {f"{g.prompt.id}|{t}" for g in groups for t in (*g.target_ids, *g.off_target_ids)}
    )
    probed = sorted({r["layer"] for r in probes["layers"] if r["variant"] == "raw"})
    layers = [layer for layer in probed if layer in set(c.captured_layers(act_dir))]
    if match_probe.layer not in layers:
        raise DataError(f"{act_dir}: no OOD activations at the probe's layer {match_probe.layer}")
    scores = {
        layer: dict(
            zip(
                keys,
                load_probe(c.PROBES / f"raw_L{layer:03d}.json")
                .score(c.features(act_dir, layer, keys, "the OOD groups"))
                .tolist(),
                strict=True,
            )
        )
        for layer in layers
    }

    # (group, role, task, comparisons): every task gets comparisons matched to its own utility.
    plan: list[tuple[Group, str, str, list[str]]] = []
    for g in groups:
        for role, tasks in (("target", g.target_ids), ("off_target", g.off_target_ids)):
            for t in tasks:
                mu = utilities.get(t, scores[match_probe.layer][f"{BASELINE}|{t}"])
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

    behaviour: list[Behaviour] = []
    outcome_rows = []
    for g, role, t, comps in plan:
        deltas, bases = [], []
        for k in comps:
            base, manip = p_target[(None, t, k)], p_target[(g.prompt.system_prompt, t, k)]
            deltas.append(manip - base)
            bases.append(base)
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
        behaviour.append((g, role, t, len(comps), float(np.mean(deltas)), float(np.mean(bases))))
    side = split_prompts([g.prompt for g in groups], oc.select_share, cfg.seed)
    result = {
        "model": params.model,
        "n_pair_orders": len(orders),
        **analyse(groups, behaviour, scores, side, oc.layer, match_probe.layer),
    }
    result["probe"] = str(c.PROBES / f"raw_L{result['layer']:03d}.json")
    result["layer_choice"]["select_share"] = oc.select_share
    bad = [r["group"] for r in result["groups"] if not math.isfinite(r["behaviour_delta"])]
    if bad:  # nothing is written: a NaN delta would drop silently out of every correlation
        raise DataError(f"OOD group {bad[0]}: non-finite behavioural delta ({len(bad)} groups)")
    write_jsonl(c.RESULTS / "ood_outcomes.jsonl", outcome_rows)
    write_json(c.RESULTS / "ood.json", c.clean_json(result))


# One task's behavioural result: group, role, task, comparisons, mean delta, mean P(baseline).
Behaviour = tuple[Group, str, str, int, float, float]


def analyse(
    groups: Sequence[Group],
    behaviour: Sequence[Behaviour],
    scores: dict[int, dict[str, float]],
    side: dict[str, str],
    method: str,
    probes_layer: int,
) -> dict[str, Any]:
    """Return the OOD analysis: the layer chosen on the selection prompts (or the probes
    stage's layer), then the held-out prompts, the selection prompts and all prompts apart.

    `scores[layer]["<prompt id>|<task>"]` is that layer's probe score (`baseline|<task>`
    without a system prompt); `side[prompt id]` is "select" or "heldout".
    """

    def task_rows_at(layer: int) -> list[dict[str, Any]]:
        return [
            {
                "group": g.id,
                "kind": g.kind,
                "prompt_set": side[g.prompt.id],
                "role": role,
                "task": t,
                "n_comparisons": n,
                "behaviour_delta": delta,
                "probe_delta": scores[layer][f"{g.prompt.id}|{t}"]
                - scores[layer][f"{BASELINE}|{t}"],
                "p_baseline": p_base,
            }
            for g, role, t, n, delta, p_base in behaviour
        ]

    def group_rows_at(layer: int) -> list[dict[str, Any]]:
        tasks = task_rows_at(layer)
        return [
            {
                **group_row(g, [r for r in tasks if r["group"] == g.id]),
                "prompt_set": side[g.prompt.id],
            }
            for g in groups
        ]

    # The choice sees the selection prompts only: the held-out ones never inform it.
    selection_r = {}
    for layer in sorted(scores):
        chosen_from = [r for r in group_rows_at(layer) if r["prompt_set"] == SELECT]
        pearson = correlation(*_deltas(chosen_from))["pearson"]
        selection_r[layer] = pearson["r"] if pearson else None
    layer = choose_layer(selection_r) if method == "select" else probes_layer
    task_rows, rows = task_rows_at(layer), group_rows_at(layer)

    def subset(name: str) -> dict[str, Any]:
        return summarise(
            [r for r in rows if r["prompt_set"] == name],
            [r for r in task_rows if r["prompt_set"] == name],
        )

    return {
        "layer": layer,
        "layer_choice": {
            "method": method,
            "selection_pearson_by_layer": {str(k): v for k, v in selection_r.items()},
            "probes_stage_layer": probes_layer,
        },
        "prompt_sets": {s: sorted(p for p, v in side.items() if v == s) for s in (SELECT, HELDOUT)},
        "n_groups": len(rows),
        # The reported OOD generalisation: the held-out prompts, which chose nothing.
        HELDOUT: subset(HELDOUT),
        SELECT: subset(SELECT),
        "all_prompts": summarise(rows, task_rows),
        "groups": rows,
        "tasks": task_rows,
    }


def _deltas(rows: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    return [r["behaviour_delta"] for r in rows], [r["probe_delta"] for r in rows]


def summarise(
    rows: Sequence[dict[str, Any]], task_rows: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Return the OOD analysis of a set of groups (and their tasks): correlations, intent,
    specificity, competing flips and personas; empty sets give n 0 and no correlation."""
    beh, prb = _deltas(rows)
    dirs = [r["direction"] for r in rows]

    def share(key: str) -> float | None:
        return float(np.mean([r[key] > 0 for r in rows])) if rows else None

    def mean(key: str) -> float | None:
        return float(np.mean([r[key] for r in rows])) if rows else None

    return {
        "n_groups": len(rows),
        "prompts": sorted({r["prompt"] for r in rows}),
        "targeted": correlation(beh, prb),
        "overall": correlation(*_deltas(task_rows)),
        "by_kind": {
            kind: correlation(*_deltas([r for r in rows if r["kind"] == kind]))
            for kind in sorted({r["kind"] for r in rows})
        },
        "behaviour_matches_intent": sign_agreement(beh, dirs) if rows else None,
        "probe_matches_intent": sign_agreement(prb, dirs) if rows else None,
        "specificity": {
            "behaviour": mean("behaviour_specificity"),
            "probe": mean("probe_specificity"),
            "behaviour_share_on_target_larger": share("behaviour_specificity"),
            "probe_share_on_target_larger": share("probe_specificity"),
        },
        "competing": competing_flips(rows),
        "personas": persona_summary(rows),
    }


if __name__ == "__main__":
    run_stage(main)
