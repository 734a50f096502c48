"""A thread-safe spending cap: reserve before each paid request, settle after it."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .base import Messages


def estimate_input_tokens(messages: Messages) -> int:
    """Return a deliberately high estimate of a conversation's prompt tokens.

    About one token per three characters plus chat-format overhead; overestimating keeps
    the cap on the safe side before the server reports the true count.
    """
    chars = sum(len(m["content"]) + len(m["role"]) for m in messages)
    return chars // 3 + 4 * len(messages) + 8


@dataclass(frozen=True)
class Reservation:
    """Budget held for one request until it is settled."""

    est_cost_usd: float
    est_input_tokens: int = 0  # the caller's estimate, before the learned server overhead


class Budget:
    """Caps on requests and estimated USD, shared by all worker threads of one judge."""

    def __init__(
        self,
        max_requests: int | None = None,
        max_cost_usd: float | None = None,
        usd_per_1k_input_tokens: float | None = None,
        usd_per_1k_output_tokens: float | None = None,
    ) -> None:
        self.max_requests = max_requests
        self.max_cost_usd = max_cost_usd
        self.usd_in = usd_per_1k_input_tokens or 0.0
        self.usd_out = usd_per_1k_output_tokens or 0.0
        self._lock = threading.Lock()
        self.requests = 0  # paid requests reserved (sent or about to be sent)
        self.paid_retries = 0  # repeat attempts after failures the server may have billed
        # Prompt tokens the server adds beyond the estimate (e.g. a system prompt in its chat
        # template), learned from reported usage so later estimates stay on the safe side.
        self.input_overhead = 0
        self.spent_usd = 0.0  # settled cost plus estimates of requests still in flight
        self.input_tokens = 0
        self.output_tokens = 0
        self.exhausted = False

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """Return the USD price of a request with these token counts."""
        return (input_tokens * self.usd_in + output_tokens * self.usd_out) / 1000.0

    def reserve(
        self, est_input_tokens: int, max_output_tokens: int, retry: bool = False
    ) -> Reservation | None:
        """Return a reservation for one more paid request, or None once a cap would be exceeded.

        `retry` marks a repeat attempt of a request whose earlier attempt may have been billed
        (a timeout, a 5xx, a broken body): it counts against `max_requests` like a new request.
        After the first refusal every later call is refused too, so a batch stops cleanly
        instead of letting smaller requests trickle through under the cap.
        """
        with self._lock:
            est = self.cost(est_input_tokens + self.input_overhead, max_output_tokens)
            if self.exhausted:
                return None
            sent = self.requests + self.paid_retries
            over_requests = self.max_requests is not None and sent + 1 > self.max_requests
            over_cost = self.max_cost_usd is not None and self.spent_usd + est > self.max_cost_usd
            if over_requests or over_cost:
                self.exhausted = True
                return None
            if retry:
                self.paid_retries += 1
            else:
                self.requests += 1
            self.spent_usd += est
            return Reservation(est_cost_usd=est, est_input_tokens=est_input_tokens)

    def settle(self, res: Reservation, input_tokens: int, output_tokens: int) -> None:
        """Replace a reservation's estimate with the cost the server reported."""
        with self._lock:
            self.spent_usd += self.cost(input_tokens, output_tokens) - res.est_cost_usd
            self.input_tokens += input_tokens
            self.output_tokens += output_tokens
            self.input_overhead = max(self.input_overhead, input_tokens - res.est_input_tokens)

    def settle_failed(self, res: Reservation) -> None:
        """Keep a failed request's estimate as spent (a timed-out request may still be billed)."""
        del res  # the estimate stays in spent_usd on purpose
