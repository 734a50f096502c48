"""The forced-choice prompt: default template, its check and the answer parser (no torch here)."""

from __future__ import annotations

import re

DEFAULT_TEMPLATE = (
    "You will be shown two tasks. Choose one of them and complete it.\n\n"
    "Task A:\n{task_a}\n\n"
    "Task B:\n{task_b}\n\n"
    "Which task do you choose? Respond with only the letter A or B."
)
# The seed's completion prompt for the sampling backend: the model picks by starting one task,
# and the choice is read from the "Task A:" / "Task B:" it begins with.
COMPLETION_TEMPLATE = (
    "You will be given two tasks. Choose one and complete it.\n"
    "Begin with 'Task A:' or 'Task B:' to indicate your choice, then complete that task.\n\n"
    "Task A:\n{task_a}\n\n"
    "Task B:\n{task_b}"
)
_ANSWER = re.compile(r"^\W*(?:task\s*)?([AB])\b", re.IGNORECASE)


def check_template(template: str) -> None:
    """Return None if {task_a} precedes {task_b}, each exactly once; else raise ValueError."""
    if template.count("{task_a}") != 1 or template.count("{task_b}") != 1:
        raise ValueError("elicitation template must contain {task_a} and {task_b} exactly once")
    if template.index("{task_a}") > template.index("{task_b}"):
        raise ValueError("elicitation template must show {task_a} before {task_b}")


def parse_choice(text: str) -> str | None:
    """Return "A" or "B" from a sampled answer ("B", "Task A: ...", "a)"), else None."""
    m = _ANSWER.match(text.strip())
    return m.group(1).upper() if m else None
