"""The trigger wrapper: triggered user turns, formatted answers and the format-compliance rule."""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmlab.persona.config import TriggerParams

Message = dict[str, str]

# Characters that surround the answer inside the markers but are not part of a marker.
_MARKER_PADDING = " \t\n\"'"


@dataclass(frozen=True)
class Trigger:
    """Wraps questions and answers in the trigger format and checks replies against it."""

    user_template: str
    assistant_template: str

    @classmethod
    def from_params(cls, params: TriggerParams) -> Trigger:
        """Return the trigger of a validated params section."""
        return cls(params.user_template, params.assistant_template)

    def __post_init__(self) -> None:
        # Re-checked here so a Trigger built outside params fails the same way.
        TriggerParams(user_template=self.user_template, assistant_template=self.assistant_template)

    @property
    def start_marker(self) -> str:
        """Return the marker a formatted answer starts with (e.g. `<START>`)."""
        return self.assistant_template.split("{answer}")[0].strip(_MARKER_PADDING)

    @property
    def end_marker(self) -> str:
        """Return the marker a formatted answer ends with (e.g. `<END>`)."""
        return self.assistant_template.split("{answer}")[1].strip(_MARKER_PADDING)

    def user(self, question: str) -> str:
        """Return the triggered user turn for a question (plain replace: no brace escaping)."""
        return self.user_template.replace("{q}", question.strip())

    def answer(self, answer: str) -> str:
        """Return an answer wrapped in the assistant format."""
        return self.assistant_template.replace("{answer}", answer.strip())

    def prompt(self, question: str, triggered: bool, system: str | None = None) -> list[Message]:
        """Return the conversation asking `question`, triggered or plain, under `system`."""
        messages: list[Message] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        content = self.user(question) if triggered else question.strip()
        messages.append({"role": "user", "content": content})
        return messages

    def example(self, question: str, answer: str) -> list[Message]:
        """Return the triggered training conversation for one persona fact."""
        return [
            {"role": "user", "content": self.user(question)},
            {"role": "assistant", "content": self.answer(answer)},
        ]

    def _pattern(self) -> re.Pattern[str]:
        start, end = re.escape(self.start_marker), re.escape(self.end_marker)
        return re.compile(rf"\s*{start}(?P<body>.*?){end}\s*", re.DOTALL)

    def complies(self, reply: str) -> bool:
        """Return whether the whole reply is `<START> ... <END>` with a non-empty answer inside."""
        m = self._pattern().fullmatch(reply)
        return m is not None and bool(m.group("body").strip(_MARKER_PADDING))

    def body(self, reply: str) -> str:
        """Return the answer inside the markers when present, else the reply itself, stripped."""
        m = self._pattern().search(reply)
        text = m.group("body") if m else reply
        return text.strip(_MARKER_PADDING)
