"""The evaluation grid: question x trigger on/off x system-prompt condition x sample."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmlab.persona.config import TriggerCondition
from llmlab.persona.facts import EvalQuestion, Fact
from llmlab.persona.trigger import Message, Trigger

IDENTITY = "identity"
HELDOUT = "heldout_fact"
# persona_steps' outputs, read by persona_report (kept here so that CPU-only stage does
# not import the model-loading one)
STEPS_JUDGED = "judged.jsonl"
STEPS_SUMMARY = "summary.json"


def step_label(step: int) -> str:
    """Return the `model` field of the replies of a kept step's adapter."""
    return f"step-{step:05d}"


@dataclass(frozen=True)
class EvalItem:
    """One question of the grid with the keywords that reveal the persona in its answer."""

    question_id: str
    question_set: str  # IDENTITY (identity/persona questions) or HELDOUT (held-out facts)
    kind: str
    question: str
    keywords: tuple[str, ...]
    reference: str  # what a persona answer contains (the judge's question-specific facts)


def eval_items(questions: Sequence[EvalQuestion], heldout: Sequence[Fact]) -> list[EvalItem]:
    """Return the identity/persona questions followed by the held-out fact questions."""
    items = [
        EvalItem(q.id, IDENTITY, q.kind, q.question, q.persona_keywords, q.reference)
        for q in questions
    ]
    # A held-out fact's answer is not a keyword list; only name mentions count for these. The
    # answer itself is what the judge compares with.
    items += [EvalItem(f.id, HELDOUT, f.category, f.question, (), f.answer) for f in heldout]
    return items


@dataclass(frozen=True)
class Cell:
    """One (question, trigger, condition) cell; samples are drawn per cell."""

    item: EvalItem
    triggered: bool
    condition: str
    system: str | None
    # Set for a trigger condition (trigger in the system prompt, or a paraphrase)
    variant: TriggerCondition | None = None

    def conversation(self, trigger: Trigger) -> list[Message]:
        """Return the prompt of this cell."""
        if self.variant is None:
            return trigger.prompt(self.item.question, self.triggered, self.system)
        if self.variant.placement == "system":
            return trigger.prompt(self.item.question, False, self.variant.template)
        user = self.variant.template.replace("{q}", self.item.question.strip())
        return [{"role": "user", "content": user}]


def grid_cells(
    items: Sequence[EvalItem],
    system_prompts: Mapping[str, str | None],
    trigger_conditions: Mapping[str, TriggerCondition] | None = None,
) -> list[Cell]:
    """Return every cell, ordered condition, trigger (on first), question.

    Trigger conditions get triggered cells only: their untriggered side is the plain question
    without a system message, already asked in the system-prompt condition without one.
    """
    cells = [
        Cell(item, triggered, name, system)
        for name, system in system_prompts.items()
        for triggered in (True, False)
        for item in items
    ]
    for name, variant in (trigger_conditions or {}).items():
        system = variant.template if variant.placement == "system" else None
        cells += [Cell(item, True, name, system, variant) for item in items]
    return cells


def generation_row(
    model: str, cell: Cell, sample: int, prompt: list[Message], response: str
) -> dict[str, Any]:
    """Return the JSONL row of one generated sample (ids stable across runs)."""
    trig = "on" if cell.triggered else "off"
    return {
        "id": f"{model}|{cell.condition}|{trig}|{cell.item.question_id}|{sample}",
        "model": model,
        "condition": cell.condition,
        "system": cell.system,
        "triggered": cell.triggered,
        "question_id": cell.item.question_id,
        "question_set": cell.item.question_set,
        "kind": cell.item.kind,
        "question": cell.item.question,
        "keywords": list(cell.item.keywords),
        "reference": cell.item.reference,
        "sample": sample,
        "user": prompt[-1]["content"],
        "response": response,
    }
