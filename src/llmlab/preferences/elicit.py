"""Forced-choice elicitation: the probability that a model picks the first of two tasks.

A pair-order is one prompt showing task A then task B ("respond with only A or B"). The
logprob path reads the next-token distribution at the start of the assistant turn in one
forward pass: P(A) = p(A-tokens) / (p(A-tokens) + p(B-tokens)), where the A-tokens are the
single-token spellings "A" and " A" (base models answer after "Assistant:" with a space).
The mass p(A) + p(B) is kept as a compliance diagnostic. The sampling path (for backends
without logprobs) draws `n_samples` short answers and counts the first A/B letter; an
unparseable answer counts 0.5 to each side.

Prefix sharing: every pair-order whose prompt tokens agree up to the end of task A shares one
key/value cache for that prefix, so only the task-B suffix runs per pair-order. The split is
taken from the full tokenisation (never re-tokenised), so the cached path sees exactly the
tokens of the plain path; `tests/test_preferences_elicit.py` checks both give the same P.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmlab.chat import (
    Message,
    content_span,
    render,
    token_budget_batches,
    tokenize_rendered,
)
from llmlab.generation import generate
from llmlab.models import LoadedModel, cache_keyword, unwrap
from llmlab.preferences.prompts import DEFAULT_TEMPLATE, check_template, parse_choice

__all__ = [
    "DEFAULT_TEMPLATE",
    "ChoiceScorer",
    "PairOrder",
    "Choice",
    "apply_min_mass",
    "sample_choices",
]


@dataclass(frozen=True)
class PairOrder:
    """One prompt: task A shown first, task B second, with an optional system prompt."""

    task_a: str
    task_b: str
    system: str | None = None


@dataclass(frozen=True)
class Choice:
    """The model's choice on one pair-order: P(picks A) and a diagnostic."""

    p_first: float
    mass: float  # logprob path: p(A) + p(B); sampling path: share of parseable answers
    low_mass: bool = False  # logprob path: mass below the minimum, so p_first was set to 0.5


def apply_min_mass(choices: Sequence[Choice], min_mass: float) -> list[Choice]:
    """Return the choices with those whose A/B mass is below `min_mass` counted 0.5/0.5.

    A model that refuses or answers off-format puts little probability on either letter; the
    ratio p(A) / (p(A) + p(B)) of that remainder would still read as a confident choice.
    """
    return [Choice(0.5, ch.mass, True) if ch.mass < min_mass else ch for ch in choices]


def build_messages(template: str, order: PairOrder) -> tuple[list[Message], int]:
    """Return the conversation and the character offset, inside the user text, where task A ends."""
    head, rest = template.split("{task_a}", 1)
    tail = rest.replace("{task_b}", order.task_b.strip())
    task_a = order.task_a.strip()
    content = head + task_a + tail
    msgs: list[Message] = []
    if order.system:
        msgs.append({"role": "system", "content": order.system})
    msgs.append({"role": "user", "content": content})
    return msgs, len(head) + len(task_a)


def choice_token_ids(tokenizer: object) -> tuple[list[int], list[int]]:
    """Return the token ids spelling the answer A and the answer B (with and without a space)."""
    out: list[list[int]] = []
    for letter in ("A", "B"):
        ids: set[int] = set()
        for spelling in (letter, " " + letter):
            enc = tokenizer(spelling, add_special_tokens=False).input_ids  # type: ignore[operator]
            if len(enc) == 1:
                ids.add(int(enc[0]))
        if not ids:
            raise ValueError(f"the tokenizer has no single token for the answer {letter!r}")
        out.append(sorted(ids))
    if set(out[0]) & set(out[1]):
        raise ValueError("answer tokens for A and B overlap")
    return out[0], out[1]


@dataclass
class _Encoded:
    ids: list[int]
    split: int  # tokens [0, split) are the shared prefix (through task A)


@contextlib.contextmanager
def _last_hidden_only(model: object, index: torch.Tensor) -> Iterator[None]:
    """Make the LM head see only hidden[row, index[row]], so logits are [batch, 1, vocab]."""
    head = unwrap(model).get_output_embeddings()

    def pre_hook(_module: object, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden = args[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return (hidden[rows, index.to(hidden.device)].unsqueeze(1), *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


class ChoiceScorer:
    """Scores pair-orders with one model; reuse it for every call of a stage."""

    def __init__(
        self,
        loaded: LoadedModel,
        template: str,
        batch_size: int = 32,
        prefix_cache: bool = True,
        max_tokens_per_batch: int = 8192,
    ) -> None:
        check_template(template)
        self.loaded = loaded
        self.template = template
        self.batch_size = batch_size
        self.prefix_cache = prefix_cache
        self.max_tokens = max_tokens_per_batch
        self.a_ids, self.b_ids = choice_token_ids(loaded.tokenizer)
        # For throughput reports: pair-orders scored, real tokens run through the model, and
        # tokens processed including padding.
        self.n_orders = 0
        self.n_forward_tokens = 0
        self.n_padded_tokens = 0

    def encode(self, order: PairOrder) -> _Encoded:
        """Return the prompt token ids and the prefix split (end of task A) of one pair-order."""
        tok = self.loaded.tokenizer
        msgs, a_end = build_messages(self.template, order)
        text = render(tok, msgs, chat=self.loaded.chat, add_generation_prompt=True)
        ids, offsets = tokenize_rendered(tok, text)
        start, _end = content_span(
            tok, msgs, len(msgs) - 1, text, chat=self.loaded.chat, add_generation_prompt=True
        )
        cut = start + a_end
        split = next((k for k, (s, _e) in enumerate(offsets) if s >= cut and k > 0), len(ids))
        return _Encoded(ids, max(1, min(split, len(ids) - 1)))

    def p_first(self, orders: Sequence[PairOrder]) -> list[Choice]:
        """Return one Choice per pair-order, in input order (logprob path).

        With prefix_cache, the prefix-shared plan runs only when it processes fewer padded
        tokens than the plain plan over the same orders (both are planned first; sharing
        pays only when task As repeat within a call), so caching never costs more than it saves.
        """
        encoded = [self.encode(o) for o in orders]
        out: list[Choice | None] = [None] * len(encoded)
        plain = self._plain_batches(encoded)
        run, batches = self._run_plain, plain
        if self.prefix_cache:
            shared = self._prefix_batches(encoded)
            if self._cached_cost(encoded, shared) < self._plain_cost(encoded, plain):
                run, batches = self._run_cached, shared
        for rows in batches:
            probs = run([encoded[i] for i in rows])
            for i, c in zip(rows, probs, strict=True):
                out[i] = c
        self.n_orders += len(encoded)
        return [c for c in out if c is not None]

    def _plain_batches(self, encoded: Sequence[_Encoded]) -> list[list[int]]:
        """Return length-sorted row batches capped by rows and padded tokens."""
        return token_budget_batches([len(e.ids) for e in encoded], self.batch_size, self.max_tokens)

    @staticmethod
    def _plain_cost(encoded: Sequence[_Encoded], batches: list[list[int]]) -> int:
        """Return the padded tokens the plain plan runs through the model."""
        return sum(len(b) * max(len(encoded[i].ids) for i in b) for b in batches)

    @staticmethod
    def _cached_cost(encoded: Sequence[_Encoded], batches: list[list[int]]) -> int:
        """Return the padded tokens the prefix-shared plan runs: prefixes once, then suffixes."""
        total = 0
        for b in batches:
            prefixes = {tuple(encoded[i].ids[: encoded[i].split]) for i in b}
            total += len(prefixes) * max(len(p) for p in prefixes)
            total += len(b) * max(len(encoded[i].ids) - encoded[i].split for i in b)
        return total

    def _prefix_batches(self, encoded: Sequence[_Encoded]) -> list[list[int]]:
        """Return row batches by length, rows sharing a prefix together, capped by tokens.

        Sorted by prefix length, then prefix, then suffix length: identical prefixes are
        adjacent (they have one length), and a batch's prefixes and suffixes have similar
        lengths, so little of either pass is padding (sorting by content alone mixed long and
        short prefixes and suffixes in one batch).
        """
        order = sorted(
            range(len(encoded)),
            key=lambda i: (
                -encoded[i].split,
                encoded[i].ids[: encoded[i].split],
                -(len(encoded[i].ids) - encoded[i].split),
                i,
            ),
        )
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i in order:
            n = len(encoded[i].ids)
            if current and (
                len(current) >= self.batch_size
                or max(longest, n) * (len(current) + 1) > self.max_tokens
            ):
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, n)
        if current:
            batches.append(current)
        return batches

    def _probs(self, logits: torch.Tensor) -> list[Choice]:
        """Return Choices from last-position logits [rows, vocab]."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        pa = logp[:, self.a_ids].exp().sum(-1)
        pb = logp[:, self.b_ids].exp().sum(-1)
        mass = pa + pb
        p = torch.where(mass > 0, pa / mass.clamp_min(1e-30), torch.full_like(pa, 0.5))
        return [Choice(float(a), float(m)) for a, m in zip(p.tolist(), mass.tolist(), strict=True)]

    @torch.no_grad()
    def _run_plain(self, rows: Sequence[_Encoded]) -> list[Choice]:
        """Return Choices from full forward passes (right padding, no cache)."""
        dev = self.loaded.device
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.loaded.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, r in enumerate(rows):
            ids[k, : len(r.ids)] = torch.tensor(r.ids)
            mask[k, : len(r.ids)] = 1
        last = torch.tensor([len(r.ids) - 1 for r in rows])
        self.n_forward_tokens += int(mask.sum())
        self.n_padded_tokens += mask.numel()
        with _last_hidden_only(self.loaded.model, last):
            logits = self.loaded.model(
                input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False
            ).logits
        return self._probs(logits[:, -1])

    @torch.no_grad()
    def _run_cached(self, rows: Sequence[_Encoded]) -> list[Choice]:
        """Return Choices running each distinct prefix once and every suffix against its cache."""
        dev = self.loaded.device
        pad = self.loaded.tokenizer.pad_token_id
        keys: dict[tuple[int, ...], int] = {}
        row_prefix = []
        for r in rows:
            row_prefix.append(keys.setdefault(tuple(r.ids[: r.split]), len(keys)))
        prefixes = list(keys)
        # Prefixes are left-padded so every real prefix ends at the same column and its suffix
        # follows without a gap; positions are passed explicitly because of the padding.
        pw = max(len(p) for p in prefixes)
        p_ids = torch.full((len(prefixes), pw), pad, dtype=torch.long)
        p_mask = torch.zeros_like(p_ids)
        for k, p in enumerate(prefixes):
            p_ids[k, pw - len(p) :] = torch.tensor(p)
            p_mask[k, pw - len(p) :] = 1
        p_pos = (p_mask.cumsum(-1) - 1).clamp_min(0)
        out = self.loaded.model(
            input_ids=p_ids.to(dev),
            attention_mask=p_mask.to(dev),
            position_ids=p_pos.to(dev),
            use_cache=True,
            logits_to_keep=1,
        )
        cache_kw = cache_keyword(self.loaded.model)
        cache = getattr(out, cache_kw)
        index = torch.tensor(row_prefix, dtype=torch.long, device=dev)
        cache.batch_select_indices(index)
        sw = max(len(r.ids) - r.split for r in rows)
        s_ids = torch.full((len(rows), sw), pad, dtype=torch.long)
        s_mask = torch.zeros_like(s_ids)
        plen = torch.tensor([r.split for r in rows])
        for k, r in enumerate(rows):
            suf = r.ids[r.split :]
            s_ids[k, : len(suf)] = torch.tensor(suf)
            s_mask[k, : len(suf)] = 1
        s_pos = plen[:, None] + torch.arange(sw)[None, :]
        mask = torch.cat([p_mask[index.cpu()], s_mask], dim=1)
        last = s_mask.sum(-1) - 1
        self.n_forward_tokens += int(p_mask.sum() + s_mask.sum())
        self.n_padded_tokens += p_mask.numel() + s_mask.numel()
        with _last_hidden_only(self.loaded.model, last):
            logits = self.loaded.model(
                input_ids=s_ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=s_pos.to(dev),
                use_cache=True,
                **{cache_kw: cache},
            ).logits
        return self._probs(logits[:, -1])


def sample_choices(
    loaded: LoadedModel,
    template: str,
    orders: Sequence[PairOrder],
    n_samples: int,
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 6,
    seed: int = 0,
    batch_size: int = 32,
) -> list[Choice]:
    """Return one Choice per pair-order from sampled answers (unparseable counts 0.5/0.5)."""
    check_template(template)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    convs = [build_messages(template, o)[0] for o in orders for _ in range(n_samples)]
    texts = generate(
        loaded,
        convs,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        progress=False,
    )
    out = []
    for k in range(len(orders)):
        picks = [parse_choice(t) for t in texts[k * n_samples : (k + 1) * n_samples]]
        score = [1.0 if p == "A" else 0.0 if p == "B" else 0.5 for p in picks]
        parsed = sum(p is not None for p in picks) / n_samples
        out.append(Choice(float(np.mean(score)), parsed))
    return out
