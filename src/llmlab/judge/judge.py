"""The Judge: a backend plus cache, budget and a thread pool, with yes/no and 0-100 questions."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from .base import (
    JudgeBackend,
    JudgeError,
    JudgeReply,
    Messages,
    Prompt,
    RetryRefused,
    to_messages,
)
from .budget import Budget, estimate_input_tokens
from .cache import ResponseCache, cache_key, resolve_cache_dir
from .config import JudgeConfig
from .parsing import (
    MIN_MASS,
    aggregate_0_100,
    parse_int_text,
    parse_yes_no_logprobs,
    parse_yes_no_text,
)

log = logging.getLogger(__name__)

Status = Literal["ok", "unscorable", "failed", "budget_exhausted"]

# Where the openai client sends requests when judge.base_url is not set.
OPENAI_DEFAULT_URL = "https://api.openai.com/v1"
# Alternatives asked for at the first position (the OpenAI API maximum).
TOP_LOGPROBS = 20
# The 0-100 judge answers in one token and is read from that token's distribution.
SCORE_MAX_TOKENS = 1


@dataclass(frozen=True)
class Verdict:
    """A yes/no judgement; label and p_yes are None unless status is "ok"."""

    label: Literal["YES", "NO"] | None
    p_yes: float | None  # None when the label came from the text alone
    status: Status
    raw: str  # the reply text, or the error message of a failed item


@dataclass(frozen=True)
class Score:
    """A 0-100 judgement; score is None unless status is "ok"."""

    score: float | None
    status: Status
    raw: str
    numeric_mass: float | None = None  # probability on integer tokens in [0, 100]


class JudgeFailed(JudgeError):
    """Too many of a stage's judge items got no answer; the stage must not write a result."""


@dataclass(frozen=True)
class JudgeCounts:
    """The three outcomes of a batch of judge items, kept apart.

    judged: the judge answered and the answer was read; unscorable: the judge answered but the
    answer could not be read; failed: no answer at all (transport error, budget stop,
    malformed body after retries).
    """

    planned: int
    judged: int
    unscorable: int
    failed: int

    @property
    def failed_share(self) -> float:
        """Return failed / planned (0 for an empty batch)."""
        return self.failed / self.planned if self.planned else 0.0

    @property
    def judged_share(self) -> float:
        """Return judged / planned (1 for an empty batch: nothing was missing)."""
        return self.judged / self.planned if self.planned else 1.0

    def to_dict(self) -> dict[str, int | float]:
        """Return the counts and the judged share for summaries and metrics."""
        return {
            "planned": self.planned,
            "judged": self.judged,
            "unscorable": self.unscorable,
            "failed": self.failed,
            "judged_share": round(self.judged_share, 4),
        }

    def describe(self) -> str:
        """Return the counts as one short phrase for reports and errors."""
        return f"judged {self.judged}, unscorable {self.unscorable}, failed {self.failed}"


FAILED_STATUSES = frozenset({"failed", "budget_exhausted"})


def count_statuses(statuses: Sequence[str]) -> JudgeCounts:
    """Return the judged / unscorable / failed counts of item statuses."""
    failed = sum(s in FAILED_STATUSES for s in statuses)
    unscorable = sum(s == "unscorable" for s in statuses)
    return JudgeCounts(len(statuses), len(statuses) - failed - unscorable, unscorable, failed)


def redact_url(url: str) -> str:
    """Return a URL without user info, query or fragment (they may carry credentials)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class _Outcome:
    """What fetching one request produced: a reply, or why there is none."""

    reply: JudgeReply | None
    status: Status
    error: str = ""


class Judge:
    """Asks a judge model many questions concurrently, caching replies and keeping to a budget."""

    def __init__(
        self,
        backend: JudgeBackend,
        *,
        cache: ResponseCache | None = None,
        budget: Budget | None = None,
        max_concurrency: int = 8,
        temperature: float = 0.0,
        max_tokens: int = 16,
        endpoint: str = "",
        max_failed_share: float = 0.0,
        min_judged_share: float = 0.9,
    ) -> None:
        self.backend = backend
        self.endpoint = endpoint or f"{backend.kind} backend"
        self.max_failed_share = max_failed_share
        self.min_judged_share = min_judged_share
        self._first_error = ""
        self.cache = cache
        self.budget = budget or Budget()
        self.max_concurrency = max_concurrency
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        if hasattr(backend, "retry_gate"):
            # retries that may be billed are paid from the same budget as first attempts
            backend.retry_gate = self._reserve_retry
        self._counts = {
            "items": 0,
            "cache_hits": 0,
            "failures": 0,
            "budget_exhausted": 0,
            "unscorable": 0,
        }

    def _bump(self, name: str, n: int = 1) -> None:
        """Add `n` to a summary counter."""
        with self._lock:
            self._counts[name] += n

    def _reserve_retry(self, messages: Messages, max_tokens: int) -> bool:
        """Return whether the budget pays for one more attempt at a request."""
        est = estimate_input_tokens(messages)
        return self.budget.reserve(est, max_tokens, retry=True) is not None

    def _lookup(
        self, messages: Messages, max_tokens: int, top_logprobs: int | None, temperature: float
    ) -> tuple[str, _Outcome | None, Any]:
        """Return (cache key, outcome, budget reservation): the outcome when the cache has the
        reply or the budget refuses the request, else None with the reservation to ask on."""
        key = cache_key(
            self.backend.kind,
            self.backend.model_name,
            messages,
            max_tokens,
            temperature,
            top_logprobs,
        )
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self._bump("cache_hits")
                return key, _Outcome(hit, "ok"), None
        res = self.budget.reserve(estimate_input_tokens(messages), max_tokens)
        if res is None:
            return key, _Outcome(None, "budget_exhausted"), None
        return key, None, res

    def _failed(self, res: Any, exc: Exception) -> _Outcome:
        """Return the outcome of a request that raised, after returning its reservation."""
        self.budget.settle_failed(res)
        msg = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, RetryRefused):
            return _Outcome(None, "budget_exhausted", msg)
        log.warning("judge: item failed: %s", msg)
        with self._lock:
            self._first_error = self._first_error or msg
        return _Outcome(None, "failed", msg)

    def _answered(self, key: str, res: Any, reply: JudgeReply) -> _Outcome:
        """Return the outcome of an answered request, after paying for it and caching it."""
        self.budget.settle(res, reply.input_tokens, reply.output_tokens)
        if self.cache is not None:
            try:
                self.cache.put(key, reply, model=self.backend.model_name, kind=self.backend.kind)
            except OSError as exc:
                # losing a cache entry costs a repeat request later, not a wrong answer
                log.warning("judge: could not write cache entry: %s", exc)
        return _Outcome(reply, "ok")

    def _fetch(
        self,
        messages: Messages,
        max_tokens: int,
        top_logprobs: int | None,
        temperature: float | None = None,
    ) -> _Outcome:
        """Return one reply from the cache or the backend; never raises."""
        temperature = self.temperature if temperature is None else temperature
        key, outcome, res = self._lookup(messages, max_tokens, top_logprobs, temperature)
        if outcome is not None:
            return outcome
        try:
            reply = self.backend.complete(
                messages,
                max_tokens=max_tokens,
                temperature=temperature,
                top_logprobs=top_logprobs,
            )
        except Exception as exc:  # noqa: BLE001 - one bad item must not sink the batch
            return self._failed(res, exc)
        return self._answered(key, res, reply)

    def _fetch_batched(
        self,
        conversations: Sequence[Messages],
        max_tokens: int,
        top_logprobs: int | None,
        temperature: float | None = None,
    ) -> list[_Outcome]:
        """Return one outcome per conversation: cached replies as they are, the rest asked of
        the backend's `complete_many` together; never raises. A batch that raises fails every
        request in it (the error names the first)."""
        temperature = self.temperature if temperature is None else temperature
        outcomes: list[_Outcome | None] = []
        pending: list[tuple[int, str, Any]] = []
        for i, messages in enumerate(conversations):
            key, outcome, res = self._lookup(messages, max_tokens, top_logprobs, temperature)
            outcomes.append(outcome)
            if outcome is None:
                pending.append((i, key, res))
        if pending:
            try:
                replies = self.backend.complete_many(  # type: ignore[attr-defined]
                    [conversations[i] for i, _, _ in pending],
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_logprobs=top_logprobs,
                )
                if len(replies) != len(pending):
                    raise JudgeError(
                        f"judge: backend returned {len(replies)} replies for {len(pending)} requests"
                    )
            except Exception as exc:  # noqa: BLE001 - recorded per item, like single requests
                for i, _, res in pending:
                    outcomes[i] = self._failed(res, exc)
            else:
                for (i, key, res), reply in zip(pending, replies, strict=True):
                    outcomes[i] = self._answered(key, res, reply)
        return [o for o in outcomes if o is not None]

    def _run(
        self,
        prompts: Sequence[Prompt],
        max_tokens: int,
        top_logprobs: int | None,
        temperature: float | None = None,
    ) -> list[_Outcome]:
        """Return one outcome per prompt, in order; identical prompts are asked once."""
        conversations = [to_messages(p) for p in prompts]
        unique: dict[str, Messages] = {}
        order: list[str] = []
        for messages in conversations:
            key = cache_key("", "", messages, 0, 0.0, None)  # only identity within this batch
            unique.setdefault(key, messages)
            order.append(key)
        keys = list(unique)
        if hasattr(self.backend, "complete_many") and len(keys) > 1:
            # a backend that answers many requests in one call (a local model's padded batches)
            outcomes = self._fetch_batched(
                [unique[k] for k in keys], max_tokens, top_logprobs, temperature
            )
        elif self.max_concurrency <= 1 or len(keys) <= 1:
            outcomes = [self._fetch(unique[k], max_tokens, top_logprobs, temperature) for k in keys]
        else:
            with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
                outcomes = list(
                    pool.map(
                        lambda k: self._fetch(unique[k], max_tokens, top_logprobs, temperature),
                        keys,
                    )
                )
        by_key = dict(zip(keys, outcomes, strict=True))
        results = [by_key[k] for k in order]
        self._bump("items", len(results))
        self._bump("failures", sum(o.status == "failed" for o in results))
        self._bump("budget_exhausted", sum(o.status == "budget_exhausted" for o in results))
        return results

    def _count_unscorable(self, results: Sequence[Verdict | Score]) -> None:
        """Add the unscorable results to the summary counter."""
        self._bump("unscorable", sum(r.status == "unscorable" for r in results))

    def yes_no(self, prompts: Sequence[Prompt]) -> list[Verdict]:
        """Return one Verdict per prompt, reading first-token logprobs, else the reply text."""
        outcomes = self._run(prompts, self.max_tokens, TOP_LOGPROBS)
        verdicts = [
            verdict_from_reply(o.reply)
            if o.reply is not None
            else Verdict(None, None, o.status, o.error)
            for o in outcomes
        ]
        self._count_unscorable(verdicts)
        return verdicts

    def score_0_100(self, prompts: Sequence[Prompt]) -> list[Score]:
        """Return one Score per prompt: the expected value of the one-token 0-100 answer."""
        outcomes = self._run(prompts, SCORE_MAX_TOKENS, TOP_LOGPROBS)
        scores = [
            score_from_reply(o.reply) if o.reply is not None else Score(None, o.status, o.error)
            for o in outcomes
        ]
        self._count_unscorable(scores)
        return scores

    def complete(
        self, prompts: Sequence[Prompt], max_tokens: int, temperature: float | None = None
    ) -> list[tuple[str | None, Status, str]]:
        """Return (reply text or None, status, error) per prompt, for free-form generation.

        Goes through the same cache, budget and retries as the scored questions, so a re-run
        after a crash pays for nothing twice. Identical prompts get one (cached) reply: callers
        that want several samples must make the prompts differ.
        """
        outcomes = self._run(prompts, max_tokens, None, temperature)
        return [
            (o.reply.text if o.reply is not None else None, o.status, o.error) for o in outcomes
        ]

    def counts(self) -> JudgeCounts:
        """Return the judged / unscorable / failed counts of every item asked so far."""
        with self._lock:
            c = dict(self._counts)
        failed = c["failures"] + c["budget_exhausted"]
        return JudgeCounts(
            c["items"], c["items"] - failed - c["unscorable"], c["unscorable"], failed
        )

    def check(self, statuses: Sequence[str], what: str) -> JudgeCounts:
        """Return the counts of `statuses`; JudgeFailed when too many items got no answer.

        Called by a judged stage before it writes anything, so a failed judge leaves the
        previous outputs in place; the answers that did arrive are already in the cache, and a
        re-run asks only for the items that failed.
        """
        return self._raise_if_failed(count_statuses(statuses), what)

    def check_all(self, what: str) -> JudgeCounts:
        """Return the counts of every item asked so far; JudgeFailed as `check` does."""
        return self._raise_if_failed(self.counts(), what)

    def _raise_if_failed(self, counts: JudgeCounts, what: str) -> JudgeCounts:
        """Return `counts`; JudgeFailed naming backend, endpoint and counts when too many failed."""
        if counts.failed_share > self.max_failed_share:
            reason = self._first_error or (
                "budget exhausted (judge.max_requests / judge.max_cost_usd)"
                if self.budget.exhausted
                else "no answer"
            )
            raise JudgeFailed(
                f"{what}: {counts.failed} of {counts.planned} judge items failed "
                f"({counts.failed_share:.1%} > judge.max_failed_share "
                f"{self.max_failed_share:.1%}); backend {self.backend.kind} at {self.endpoint}, "
                f"model {self.backend.model_name!r}: {counts.describe()}; first error: {reason}; "
                + (
                    f"nothing written; the answers received are cached in {self.cache.root}, a "
                    "re-run asks only for the rest"
                    if self.cache is not None
                    else "nothing written; judge.cache_dir is null, so a re-run asks for all again"
                )
            )
        return counts

    def summary(self) -> dict[str, Any]:
        """Return counts of this judge's work so far (safe to log: holds no secrets)."""
        with self._lock:
            counts = dict(self._counts)
        b = self.budget
        three = self.counts()
        return {
            "backend": self.backend.kind,
            "model": self.backend.model_name,
            "endpoint": self.endpoint,
            **counts,
            "judged": three.judged,
            "failed": three.failed,
            "max_failed_share": self.max_failed_share,
            "min_judged_share": self.min_judged_share,
            "requests": b.requests,
            "paid_retries": b.paid_retries,
            "retries": self.backend.retries,
            "input_tokens": b.input_tokens,
            "output_tokens": b.output_tokens,
            "cost_usd": round(b.spent_usd, 6),
            "max_requests": b.max_requests,
            "max_cost_usd": b.max_cost_usd,
        }


def verdict_from_reply(reply: JudgeReply) -> Verdict:
    """Return the Verdict a reply supports: logprobs first, then the first word of the text."""
    if reply.top_logprobs:
        p_yes = parse_yes_no_logprobs(reply.top_logprobs, MIN_MASS)
        if p_yes is not None:
            return Verdict("YES" if p_yes >= 0.5 else "NO", p_yes, "ok", reply.text)
    label = parse_yes_no_text(reply.text)
    if label is None:
        return Verdict(None, None, "unscorable", reply.text)
    return Verdict(label, None, "ok", reply.text)


def score_from_reply(reply: JudgeReply) -> Score:
    """Return the Score a reply supports; the text is read only when there are no logprobs."""
    if reply.top_logprobs is not None:
        score, mass = aggregate_0_100(reply.top_logprobs, MIN_MASS)
        status: Status = "ok" if score is not None else "unscorable"
        return Score(score, status, reply.text, mass)
    k = parse_int_text(reply.text)
    if k is None:
        return Score(None, "unscorable", reply.text)
    return Score(float(k), "ok", reply.text)


def make_judge(cfg: JudgeConfig, local_model: Any = None, local_tokenizer: Any = None) -> Judge:
    """Return a Judge for `cfg`; JudgeError when its backend cannot be set up."""
    backend: JudgeBackend
    if cfg.backend == "openai":
        from .openai_backend import OpenAIBackend

        backend = OpenAIBackend(cfg)
        endpoint = redact_url(cfg.base_url or OPENAI_DEFAULT_URL)
    else:
        if local_model is None or local_tokenizer is None:
            raise JudgeError("judge: backend 'local' needs a loaded model and tokenizer")
        from .local_backend import LocalBackend

        backend = LocalBackend(
            local_model, local_tokenizer, model_name=cfg.model, batch_size=cfg.local_batch_size
        )
        endpoint = "this process"
    cache_dir = resolve_cache_dir(cfg.cache_dir)
    # a nameless local model (e.g. freshly initialised) cannot be told apart in cache keys
    cache = ResponseCache(cache_dir) if cache_dir is not None and backend.model_name else None
    budget = Budget(
        max_requests=cfg.max_requests,
        max_cost_usd=cfg.max_cost_usd,
        usd_per_1k_input_tokens=cfg.usd_per_1k_input_tokens,
        usd_per_1k_output_tokens=cfg.usd_per_1k_output_tokens,
    )
    return Judge(
        backend,
        cache=cache,
        budget=budget,
        max_concurrency=cfg.max_concurrency,
        temperature=cfg.temperature,
        max_tokens=cfg.max_tokens,
        endpoint=endpoint,
        max_failed_share=cfg.max_failed_share,
        min_judged_share=cfg.min_judged_share,
    )
