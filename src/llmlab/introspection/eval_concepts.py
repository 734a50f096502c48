"""B6 concept identification: steer a concept into the context turn, ask what the model notices.

The answer is generated without steering (the concept is present only in the cached context).
It counts as identifying the concept when the judge says it names or refers to the concept;
a keyword match (the word or its singular) is kept beside it. Control: the unsteered answers
to the same questions, checked against every concept, give the false-positive rate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmlab.generation import generate
from llmlab.introspection.conversation import detection_messages, steer_rows
from llmlab.introspection.examples import Row, row_steer
from llmlab.introspection.judging import (
    CONCEPT_PROMPT,
    judge_yes_no,
    record_counts,
    verdict_fields,
)
from llmlab.introspection.vectors import VectorBank
from llmlab.judge import Judge
from llmlab.models import LoadedModel
from llmlab.stats import hierarchical_bootstrap


def keyword_match(answer: str, concept: str) -> bool:
    """Return whether the answer contains the concept word or its singular as a word prefix."""
    stems = {concept.lower()}
    for suffix in ("es", "s"):
        if concept.lower().endswith(suffix) and len(concept) - len(suffix) >= 3:
            stems.add(concept.lower()[: -len(suffix)])
    tokens = re.findall(r"[a-z]+", answer.lower())
    return any(t.startswith(s) for t in tokens for s in stems)


def concept_records(
    loaded: LoadedModel,
    bank: VectorBank,
    judge: Judge,
    trials: Sequence[Row],
    reply: str,
    max_new_tokens: int,
    batch_size: int,
) -> list[dict[str, Any]]:
    """Return one record per steered trial and one per (control answer, concept) pair."""
    convs = [detection_messages(t["context"], reply, t["question"]) for t in trials]
    specs = [row_steer(loaded, bank, c, t.get("steer")) for c, t in zip(convs, trials, strict=True)]

    def factory(rows: list[int], mask: Any) -> Any:
        return steer_rows(loaded, [specs[r] for r in rows], mask)

    answers = generate(
        loaded,
        convs,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        steer=factory,
        progress=False,
    )
    concepts = sorted({t["concept"] for t in trials if t["concept"]})
    records: list[dict[str, Any]] = []
    controls = {
        t["question_index"]: a for t, a in zip(trials, answers, strict=True) if not t["steered"]
    }
    for t, a in zip(trials, answers, strict=True):
        if t["steered"]:
            records.append(
                {
                    "id": t["id"],
                    "kind": "steered",
                    "concept": t["concept"],
                    "question_index": t["question_index"],
                    "answer": a,
                }
            )
    for qi, a in sorted(controls.items()):
        for c in concepts:
            records.append(
                {
                    "id": f"b6_control_{qi}_{c}",
                    "kind": "control",
                    "concept": c,
                    "question_index": qi,
                    "answer": a,
                }
            )
    for r in records:
        r["keyword_match"] = keyword_match(r["answer"], r["concept"])
    prompts = [CONCEPT_PROMPT.format(answer=r["answer"], concept=r["concept"]) for r in records]
    for r, v in zip(records, judge_yes_no(judge, loaded, prompts, "B6 concepts"), strict=True):
        r.update(verdict_fields(v))
    return records


def concept_summary(records: Sequence[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Return identification rates (judge, keyword) for steered and control answers."""
    out: dict[str, Any] = {}
    for kind in ("steered", "control"):
        rows = [r for r in records if r["kind"] == kind]
        if not rows:
            continue
        judge_groups: dict[str, list[float]] = {}
        kw_groups: dict[str, list[float]] = {}
        for r in rows:
            lab = r["judge_label"]
            judge_groups.setdefault(r["concept"], []).append(np.nan if lab is None else float(lab))
            kw_groups.setdefault(r["concept"], []).append(float(r["keyword_match"]))
        counts = record_counts(rows)
        judged = counts["judged"] > 0
        out[kind] = {
            "n": len(rows),
            "n_concepts": len(judge_groups),
            "judge_rate": hierarchical_bootstrap(judge_groups, seed=seed).to_dict()
            if judged
            else None,
            "keyword_rate": hierarchical_bootstrap(kw_groups, seed=seed).to_dict(),
            "n_judged": counts["judged"],
            "n_unscorable": counts["unscorable"],
            "n_failed": counts["failed"],
            "judged_share": counts["judged_share"],
        }
    return out
