"""Judge backend for any OpenAI-compatible chat-completions server."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from .base import JudgeError, JudgeReply, JudgeRequestFailed, Messages, RetryRefused, merge_logprob
from .config import JudgeConfig

log = logging.getLogger(__name__)

# The OpenAI API accepts at most this many alternatives per position.
MAX_TOP_LOGPROBS = 20


class MalformedReply(Exception):
    """The server answered 2xx but the body lacks what a chat completion must have."""


def api_key_from_env(var: str) -> str:
    """Return the API key held in environment variable `var`; JudgeError when unset or empty."""
    key = os.environ.get(var, "")
    if not key:
        raise JudgeError(f"judge: environment variable {var} is not set (it must hold the API key)")
    return key


def _retryable(exc: BaseException) -> bool:
    """Return whether retrying could fix this error (rate limits, 5xx, network, bad body)."""
    import openai

    # timeouts are connection errors; a body cut short or garbled is a JSON error
    if isinstance(exc, (openai.APIConnectionError, MalformedReply, json.JSONDecodeError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return False


def may_be_billed(exc: BaseException) -> bool:
    """Return whether a failed attempt may still cost money (the server may have run it).

    Only a rate-limit refusal (429) and a connection that never opened are surely free.
    """
    import openai

    if isinstance(exc, openai.APIStatusError):
        return exc.status_code != 429
    # the HTTP library's ConnectError: the connection was refused, nothing was sent
    never_sent = type(exc.__cause__).__name__ == "ConnectError"
    return not (isinstance(exc, openai.APIConnectionError) and never_sent)


def _retry_after_s(exc: BaseException) -> float | None:
    """Return the server's Retry-After delay in seconds when it sent one."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        return float(headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


def _one_line(exc: BaseException) -> str:
    """Return an exception as a single short line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def parse_completion(resp: Any) -> JudgeReply:
    """Return the JudgeReply in a chat-completion response; MalformedReply when it has none."""
    choices = getattr(resp, "choices", None)
    if not choices:
        raise MalformedReply("response has no choices")
    choice = choices[0]
    message = getattr(choice, "message", None)
    text = getattr(message, "content", None)
    if not isinstance(text, str):
        raise MalformedReply("response choice has no text content")
    top: dict[str, float] | None = None
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if content:
        first = content[0]
        top = {}
        for alt in getattr(first, "top_logprobs", None) or []:
            merge_logprob(top, str(alt.token), float(alt.logprob))
        if not top and getattr(first, "token", None) is not None:
            # a server that ignores top_logprobs still reports the chosen token
            merge_logprob(top, str(first.token), float(first.logprob))
        top = top or None
    usage = getattr(resp, "usage", None)
    return JudgeReply(
        text=text,
        top_logprobs=top,
        input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
    )


class OpenAIBackend:
    """Chat completions over HTTP with its own retry loop (the client's is switched off)."""

    kind = "openai"

    def __init__(self, cfg: JudgeConfig, client: Any | None = None) -> None:
        self.model_name = cfg.model
        self.max_retries = cfg.max_retries
        self.backoff_base_s = cfg.backoff_base_s
        self.backoff_max_s = cfg.backoff_max_s
        if client is None:
            import openai

            client = openai.OpenAI(
                base_url=cfg.base_url,
                api_key=api_key_from_env(cfg.api_key_env),
                max_retries=0,
                timeout=cfg.timeout_s,
            )
        self._client = client
        self._lock = threading.Lock()
        self._retries = 0
        # Asked before each retry of an attempt that may have been billed; False stops the
        # retries (the Judge sets it to charge its budget).
        self.retry_gate: Callable[[Messages, int], bool] | None = None

    @property
    def retries(self) -> int:
        """Return how many retries this backend has made so far."""
        with self._lock:
            return self._retries

    def _delay_s(self, attempt: int, exc: BaseException) -> float:
        """Return the wait before retry number `attempt` (0-based): capped doubling with jitter."""
        base = min(self.backoff_max_s, self.backoff_base_s * (2.0**attempt))
        delay = base * (0.5 + random.random())  # jitter spreads workers that failed together
        hint = _retry_after_s(exc)
        if hint is not None:
            delay = max(delay, min(hint, self.backoff_max_s))
        return delay

    def complete(
        self, messages: Messages, *, max_tokens: int, temperature: float, top_logprobs: int | None
    ) -> JudgeReply:
        """Return the server's reply; JudgeRequestFailed once retries are used up."""
        kwargs: dict[str, Any] = {
            "model": self.model_name,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if top_logprobs:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = min(top_logprobs, MAX_TOP_LOGPROBS)
        attempt = 0
        while True:
            try:
                return parse_completion(self._client.chat.completions.create(**kwargs))
            except Exception as exc:  # noqa: BLE001 - classified just below
                if not _retryable(exc):
                    raise JudgeRequestFailed(f"judge request failed: {_one_line(exc)}") from None
                if attempt >= self.max_retries:
                    raise JudgeRequestFailed(
                        f"judge request failed after {attempt} retries: {_one_line(exc)}"
                    ) from None
                gate = self.retry_gate
                if gate is not None and may_be_billed(exc) and not gate(messages, max_tokens):
                    raise RetryRefused(
                        f"judge budget exhausted before retry {attempt + 1}: {_one_line(exc)}"
                    ) from None
                delay = self._delay_s(attempt, exc)
                log.info("judge: retry %d in %.2fs after %s", attempt + 1, delay, _one_line(exc))
                with self._lock:
                    self._retries += 1
                attempt += 1
                time.sleep(delay)
