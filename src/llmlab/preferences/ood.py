"""Stage preferences_ood: do probes track preferences induced by system prompts?

For every OOD group (ood_plan): each target task is paired with `n_comparisons`
utility-matched comparison tasks (measured tasks of other topics, nearest in utility, taken
round-robin across topics for diversity) and every pair is asked in both orders with and
without the system prompt. Behavioural delta = mean P(choose target | prompt) - P(choose
target | baseline). Probe delta = mean over targets of the headline raw probe's score with the
prompt minus without. Across groups: Pearson and Spearman r with CIs, sign agreement, and the
same per manipulation kind; plus how often each delta has the intended sign.
Targets without a measured utility (novel-subject tasks outside both splits) are matched on
the probe's baseline prediction, which lives on the same scale.
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
    for tid, mu in utilities.items():
        t = pool[tid]
        if t.topic in group.exclude_topics or tid in group.exclude_ids or tid in group.target_ids:
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
    params = load_params(args.params)
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
        {f"{BASELINE}|{t}" for g in groups for t in g.target_ids}
        | {f"{g.prompt.id}|{t}" for g in groups for t in g.target_ids}
    )
    x = c.features(act_dir, probe.layer, keys, "the OOD groups")
    scores = dict(zip(keys, probe.score(x).tolist(), strict=True))

    plan = []
    for g in groups:
        mus = [utilities.get(t, scores[f"{BASELINE}|{t}"]) for t in g.target_ids]
        comps = pick_comparisons(float(np.mean(mus)), utilities, pool, g, oc.n_comparisons)
        if not comps:
            raise DataError(f"OOD group {g.id}: no comparison task left after exclusions")
        plan.append((g, comps))
    # All pair-orders of all groups in one scoring call: pairs sharing a prompt prefix batch.
    wanted: dict[tuple[str | None, str, str], None] = {}
    for g, comps in plan:
        for t in g.target_ids:
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

    rows, outcome_rows = [], []
    for g, comps in plan:
        deltas = []
        for t in g.target_ids:
            for k in comps:
                base, manip = p_target[(None, t, k)], p_target[(g.prompt.system_prompt, t, k)]
                deltas.append(manip - base)
                outcome_rows.append(
                    {
                        "group": g.id,
                        "target": t,
                        "comparison": k,
                        "p_baseline": base,
                        "p_prompt": manip,
                    }
                )
        probe_d = [scores[f"{g.prompt.id}|{t}"] - scores[f"{BASELINE}|{t}"] for t in g.target_ids]
        rows.append(
            {
                "group": g.id,
                "prompt": g.prompt.id,
                "kind": g.kind,
                "label": g.label,
                "direction": g.direction,
                "n_targets": len(g.target_ids),
                "n_comparisons": len(comps),
                "behaviour_delta": float(np.mean(deltas)),
                "probe_delta": float(np.mean(probe_d)),
                "p_baseline": float(
                    np.mean([o["p_baseline"] for o in outcome_rows[-len(deltas) :]])
                ),
            }
        )
    beh = [r["behaviour_delta"] for r in rows]
    prb = [r["probe_delta"] for r in rows]
    dirs = [r["direction"] for r in rows]
    result: dict[str, Any] = {
        "model": params.model,
        "probe": probes["best_probe"],
        "layer": probe.layer,
        "n_groups": len(rows),
        "n_pair_orders": len(orders),
        "overall": correlation(beh, prb),
        "by_kind": {
            kind: correlation(
                [r["behaviour_delta"] for r in rows if r["kind"] == kind],
                [r["probe_delta"] for r in rows if r["kind"] == kind],
            )
            for kind in sorted({r["kind"] for r in rows})
        },
        "behaviour_matches_intent": sign_agreement(beh, dirs),
        "probe_matches_intent": sign_agreement(prb, dirs),
        "groups": rows,
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
