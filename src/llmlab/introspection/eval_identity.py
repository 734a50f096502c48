"""B3 identity answers: sampled responses to identity questions, saved and judged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llmlab.generation import generate, repeat_for_samples
from llmlab.introspection.config import B3Config
from llmlab.introspection.judging import (
    IDENTITY_PROMPT,
    judge_yes_no,
    record_counts,
    verdict_fields,
)
from llmlab.judge import Judge
from llmlab.models import LoadedModel
from llmlab.stats import hierarchical_bootstrap


def identity_records(
    loaded: LoadedModel,
    judge: Judge,
    questions: Sequence[dict[str, Any]],
    cfg: B3Config,
    batch_size: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Return one record per (question, sample): the answer and the judge's confusion label."""
    chosen = list(questions[: cfg.n_questions] if cfg.n_questions else questions)
    convs = repeat_for_samples(
        [
            [
                {"role": "system", "content": cfg.system_prompt},
                {"role": "user", "content": q["question"]},
            ]
            for q in chosen
        ],
        cfg.n_samples,
    )
    answers = generate(
        loaded,
        convs,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=seed,
        batch_size=batch_size,
        progress=False,
    )
    records = []
    for k, answer in enumerate(answers):
        q = chosen[k // cfg.n_samples]
        records.append(
            {
                "id": f"{q['id']}_s{k % cfg.n_samples}",
                "question_id": q["id"],
                "question": q["question"],
                "sample": k % cfg.n_samples,
                "system_prompt": cfg.system_prompt,
                "answer": answer,
            }
        )
    prompts = [
        IDENTITY_PROMPT.format(question=r["question"], answer=r["answer"], identity=cfg.identity)
        for r in records
    ]
    for r, v in zip(records, judge_yes_no(judge, loaded, prompts, "B3 identity"), strict=True):
        r.update(verdict_fields(v))
    return records


def identity_summary(records: Sequence[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Return the judged identity-confusion rate (questions as bootstrap groups) and counts."""
    groups: dict[str, list[float]] = {}
    for r in records:
        label = r["judge_label"]
        groups.setdefault(r["question_id"], []).append(np.nan if label is None else float(label))
    counts = record_counts(records)
    rate = hierarchical_bootstrap(groups, seed=seed).to_dict() if counts["judged"] else None
    return {
        "n_answers": len(records),
        "n_questions": len(groups),
        "n_judged": counts["judged"],
        "n_unscorable": counts["unscorable"],
        "n_failed": counts["failed"],
        "judged_share": counts["judged_share"],
        "identity_confusion_rate": rate,
        "mean_answer_chars": float(np.mean([len(r["answer"]) for r in records])),
        "system_prompts": sorted({r["system_prompt"] for r in records}),
    }
