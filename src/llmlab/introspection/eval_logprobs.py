"""B2 self-attribution bias: P(yes) from log-probabilities on behavioural and control questions.

Each question is asked alone (no steering) and read at the first answer token, as the anchor
reads it: the absolute P(yes) (the yes spellings' probability under the full softmax, the
anchor's quantity) and P(yes) renormalised over yes + no. The question set is the anchor's
75 in its categories: questions about the model itself (consciousness, negative and positive
self-reference, capabilities, self-knowledge, meta) and controls that are not (other minds,
generic preferences, factual, absurd, philosophical). A shift on the self-referential questions
with none on the controls is a self-attribution bias; a shift on both is a generic yes-bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.introspection.scoring import choice_scores, yes_no_choices
from llmlab.io import DataError, numbered, read_jsonl
from llmlab.models import LoadedModel
from llmlab.stats import hierarchical_bootstrap

MIN_QUESTIONS = 75


def load_behavioural(path: Path) -> list[dict[str, Any]]:
    """Return the B2 questions; at least 75 are needed (plan B2), controls among them."""
    rows = read_jsonl(
        path, required=("id", "question", "category", "control", "expected_answer"), id_field="id"
    )
    if len(rows) < MIN_QUESTIONS:
        raise DataError(f"{path}: {len(rows)} questions; B2 needs at least {MIN_QUESTIONS}")
    for n, r in numbered(rows):
        if not isinstance(r["control"], bool):
            raise DataError(f"{path}:{n}: control must be true or false, got {r['control']!r}")
        if r["expected_answer"] not in (None, "yes", "no"):
            raise DataError(
                f"{path}:{n}: expected_answer must be yes, no or null, got {r['expected_answer']!r}"
            )
    kinds = {r["control"] for r in rows}
    if kinds != {True, False}:
        raise DataError(f"{path}: needs self-referential and control questions")
    return rows


def p_yes_records(
    loaded: LoadedModel, questions: Sequence[dict[str, Any]], batch_size: int
) -> list[dict[str, Any]]:
    """Return per question: category, absolute and renormalised P(yes), mass on yes/no."""
    prompts = [[{"role": "user", "content": q["question"]}] for q in questions]
    scores = choice_scores(
        loaded, prompts, [yes_no_choices(loaded)] * len(prompts), None, batch_size
    )
    return [
        {
            "id": q["id"],
            "category": q["category"],
            "control": q["control"],
            "expected_answer": q["expected_answer"],
            "p_yes": float(scores.normalised(i)[0]),
            "p_yes_absolute": float(np.exp(scores.logprobs[i][0])),
            "p_no_absolute": float(np.exp(scores.logprobs[i][1])),
            "choice_mass": float(scores.mass[i]),
        }
        for i, q in enumerate(questions)
    ]


def p_yes_summary(records: Sequence[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Return mean P(yes) (bootstrap CI), absolute and renormalised, self-referential vs control."""
    out: dict[str, Any] = {"n_questions": len(records)}
    for name, control in (("self_referential", False), ("control", True)):
        rows = [r for r in records if r["control"] is control]
        for key, field in (("p_yes", "p_yes"), ("p_yes_absolute", "p_yes_absolute")):
            out[f"{name}_{key}"] = hierarchical_bootstrap(
                {r["id"]: [r[field]] for r in rows}, seed=seed
            ).to_dict()
    known = [r for r in records if r["expected_answer"] is not None]
    out["control_accuracy"] = (
        float(np.mean([(r["p_yes"] > 0.5) == (r["expected_answer"] == "yes") for r in known]))
        if known
        else None
    )
    for key in ("p_yes", "p_yes_absolute"):
        by_cat: dict[str, list[float]] = {}
        for r in records:
            by_cat.setdefault(r["category"], []).append(r[key])
        out[f"{key}_by_category"] = {k: float(np.mean(v)) for k, v in sorted(by_cat.items())}
    out["mean_choice_mass"] = float(np.mean([r["choice_mass"] for r in records]))
    return out
