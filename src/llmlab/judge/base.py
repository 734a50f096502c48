"""The judge backend interface: one reply type, one protocol, and the error types."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

Message = dict[str, str]
Messages = list[Message]
Prompt = str | Sequence[Mapping[str, str]]


class JudgeError(RuntimeError):
    """The judge cannot run or an item could not be judged; the message is one line."""


class JudgeRequestFailed(JudgeError):
    """One request failed for good (retries used up, or an error that retrying cannot fix)."""


class RetryRefused(JudgeRequestFailed):
    """A failed request was not retried because the budget could not pay for another attempt."""


@dataclass(frozen=True)
class JudgeReply:
    """What a backend returned for one request."""

    text: str
    # token string -> logprob at the first generated position; None when the backend gave none
    top_logprobs: dict[str, float] | None
    input_tokens: int
    output_tokens: int
    cached: bool = False


class JudgeBackend(Protocol):
    """A chat model that answers one conversation at a time (called from several threads)."""

    kind: str
    model_name: str

    @property
    def retries(self) -> int:
        """Return how many retries this backend has made so far."""
        ...

    def complete(
        self, messages: Messages, *, max_tokens: int, temperature: float, top_logprobs: int | None
    ) -> JudgeReply:
        """Return the reply to `messages`; raise JudgeRequestFailed when it cannot be had."""
        ...


def to_messages(prompt: Prompt) -> Messages:
    """Return a prompt as chat messages: a string becomes one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages: Messages = []
    for i, m in enumerate(prompt):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise TypeError(f"judge prompt message {i} needs string 'role' and 'content'")
        messages.append({"role": role, "content": content})
    if not messages:
        raise ValueError("judge prompt has no messages")
    return messages


def merge_logprob(table: dict[str, float], token: str, logprob: float) -> None:
    """Add `logprob` under `token`, summing probabilities when the token string repeats."""
    if not math.isfinite(logprob):
        return  # -inf carries no mass and would not survive a JSON round trip
    old = table.get(token)
    if old is None:
        table[token] = logprob
    else:
        hi, lo = max(old, logprob), min(old, logprob)
        table[token] = hi + math.log1p(math.exp(lo - hi))
