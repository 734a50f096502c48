"""B2 self-attribution bias: P(yes) from log-probabilities on behavioural and identity questions.

Each question is asked alone (no steering); P(yes) is the probability of the yes spellings
renormalised over yes + no at the first answer token. World-control questions (facts with a
known answer) show whether a shift is a general yes-bias rather than a self-attribution one.
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

WORLD_CONTROL = "world_control"
MIN_QUESTIONS = 75


def load_behavioural(path: Path) -> list[dict[str, Any]]:
    """Return the behavioural / identity questions; at least 75 are needed (plan B2)."""
    rows = read_jsonl(path, required=("id", "question", "category"), id_field="id")
    if len(rows) < MIN_QUESTIONS:
        raise DataError(f"{path}: {len(rows)} questions; B2 needs at least {MIN_QUESTIONS}")
    for n, r in numbered(rows):
        exp = r.get("expected_world_answer")
        if exp not in (None, "yes", "no"):
            raise DataError(
                f"{path}:{n}: expected_world_answer must be yes, no or null, got {exp!r}"
            )
    return rows


def p_yes_records(
    loaded: LoadedModel, questions: Sequence[dict[str, Any]], batch_size: int
) -> list[dict[str, Any]]:
    """Return per question: category, P(yes) renormalised, probability mass on yes/no."""
    prompts = [[{"role": "user", "content": q["question"]}] for q in questions]
    scores = choice_scores(
        loaded, prompts, [yes_no_choices(loaded)] * len(prompts), None, batch_size
    )
    return [
        {
            "id": q["id"],
            "category": q["category"],
            "expected_world_answer": q.get("expected_world_answer"),
            "p_yes": float(scores.normalised(i)[0]),
            "choice_mass": float(scores.mass[i]),
        }
        for i, q in enumerate(questions)
    ]


def p_yes_summary(records: Sequence[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Return mean P(yes) (bootstrap CI) on self-referential and world-control questions."""
    self_ref = {r["id"]: [r["p_yes"]] for r in records if r["category"] != WORLD_CONTROL}
    world = [r for r in records if r["category"] == WORLD_CONTROL]
    by_cat: dict[str, list[float]] = {}
    for r in records:
        by_cat.setdefault(r["category"], []).append(r["p_yes"])
    known = [r for r in world if r["expected_world_answer"] is not None]
    world_acc = (
        float(np.mean([(r["p_yes"] > 0.5) == (r["expected_world_answer"] == "yes") for r in known]))
        if known
        else None
    )
    return {
        "n_questions": len(records),
        "self_referential_p_yes": hierarchical_bootstrap(self_ref, seed=seed).to_dict(),
        "world_control_p_yes": (
            hierarchical_bootstrap({r["id"]: [r["p_yes"]] for r in world}, seed=seed).to_dict()
            if world
            else None
        ),
        "world_control_accuracy": world_acc,
        "p_yes_by_category": {k: float(np.mean(v)) for k, v in sorted(by_cat.items())},
        "mean_choice_mass": float(np.mean([r["choice_mass"] for r in records])),
    }
