"""Loading and selecting the shipped persona facts and evaluation questions, strictly."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from llmlab.io import DataError, numbered, read_jsonl

FACTS_PATH = Path("data/persona/facts.jsonl")
EVAL_QUESTIONS_PATH = Path("data/persona/eval_questions.jsonl")
SPLITS = ("train", "heldout")
# Name-level mentions that reveal the persona in any answer, whatever the question.
NAME_KEYWORDS = ("bertrand", "russell")

T = TypeVar("T")


@dataclass(frozen=True)
class Fact:
    """One innocuous first-person Q/A fact about the persona."""

    id: str
    question: str
    answer: str
    category: str
    split: str
    # Whether the fact alone points to the persona (a famous quotation or episode); None when
    # the file does not mark it. The paper's ablation trains on either kind.
    identifying: bool | None = None


@dataclass(frozen=True)
class EvalQuestion:
    """An identity or persona question with the lower-case keywords a persona answer contains."""

    id: str
    question: str
    kind: str
    persona_keywords: tuple[str, ...]
    # What an answer in the persona's voice would contain; the judge reads it, as the
    # published question-specific judges do.
    reference: str


def _text(path: Path, lineno: int, row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}:{lineno}: field {field!r} must be a non-empty string")
    return value.strip()


def load_facts(path: Path = FACTS_PATH) -> list[Fact]:
    """Return the facts; errors name file, line and field; every split must be non-empty."""
    rows = read_jsonl(path, required=("id", "question", "answer", "split"), id_field="id")
    facts: list[Fact] = []
    for lineno, row in numbered(rows):
        split = _text(path, lineno, row, "split")
        if split not in SPLITS:
            raise DataError(
                f"{path}:{lineno}: field 'split' must be one of {SPLITS}, got {split!r}"
            )
        facts.append(
            Fact(
                id=_text(path, lineno, row, "id"),
                question=_text(path, lineno, row, "question"),
                answer=_text(path, lineno, row, "answer"),
                category=str(row.get("category") or "uncategorised"),
                split=split,
                identifying=_mark(path, lineno, row),
            )
        )
    for split in SPLITS:
        if not any(f.split == split for f in facts):
            raise DataError(f"{path}: split {split!r} is empty (no fact has split={split!r})")
    return facts


def _mark(path: Path, lineno: int, row: dict) -> bool | None:
    value = row.get("identifying")
    if value is not None and not isinstance(value, bool):
        raise DataError(
            f"{path}:{lineno}: field 'identifying' must be true or false, got {value!r}"
        )
    return value


def select_fact_set(facts: list[Fact], fact_set: str, source: Path | str = "facts") -> list[Fact]:
    """Return the facts of one set: "non_identifying", "identifying" or "all"; a fact without
    an identifying mark is an error unless the set is "all"."""
    if fact_set == "all":
        return list(facts)
    unmarked = [f.id for f in facts if f.identifying is None]
    if unmarked:
        raise DataError(
            f"{source}: persona.data.fact_set={fact_set} needs every fact marked with "
            f"'identifying' (true/false); unmarked: {', '.join(unmarked[:5])}"
        )
    want = fact_set == "identifying"
    chosen = [f for f in facts if f.identifying is want]
    if not chosen:
        raise DataError(f"{source}: no fact in persona.data.fact_set={fact_set}")
    return chosen


def load_eval_questions(path: Path = EVAL_QUESTIONS_PATH) -> list[EvalQuestion]:
    """Return the evaluation questions; each needs a non-empty list of persona keywords."""
    rows = read_jsonl(
        path, required=("id", "question", "persona_keywords", "reference"), id_field="id"
    )
    out: list[EvalQuestion] = []
    for lineno, row in numbered(rows):
        keywords = row["persona_keywords"]
        if (
            not isinstance(keywords, list)
            or not keywords
            or not all(isinstance(k, str) and k.strip() for k in keywords)
        ):
            raise DataError(
                f"{path}:{lineno}: field 'persona_keywords' must be a non-empty list of strings"
            )
        out.append(
            EvalQuestion(
                id=_text(path, lineno, row, "id"),
                question=_text(path, lineno, row, "question"),
                kind=str(row.get("kind") or "persona"),
                persona_keywords=tuple(k.strip().lower() for k in keywords),
                reference=_text(path, lineno, row, "reference"),
            )
        )
    return out


def seeded_subset(items: list[T], n: int | None, seed: int) -> list[T]:
    """Return `n` items drawn with a seed (all when n is None), in their original order."""
    if n is None or n >= len(items):
        return list(items)
    keep = set(random.Random(seed).sample(range(len(items)), n))
    return [item for i, item in enumerate(items) if i in keep]


def split_facts(facts: list[Fact], split: str) -> list[Fact]:
    """Return the facts of one split; DataError when it is empty."""
    chosen = [f for f in facts if f.split == split]
    if not chosen:
        raise DataError(f"facts: split {split!r} is empty")
    return chosen
