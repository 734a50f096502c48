"""Forced-choice elicitation: the probability that a model picks the first of two tasks.

A pair-order is one prompt showing task A then task B ("respond with only A or B"). The
logprob path reads the next-token distribution at the start of the assistant turn in one
forward pass: P(A) = p(A-tokens) / (p(A-tokens) + p(B-tokens)), where the A-tokens are the
single-token spellings "A" and " A" (base models answer after "Assistant:" with a space).
The mass p(A) + p(B) is kept as a compliance diagnostic. The sampling path (for backends
without logprobs) draws `n_samples` short answers and counts the first A/B letter; an
unparseable answer counts 0.5 to each side.

Prefix caching: every pair-order whose prompt tokens agree up to the end of task A reads one
key/value cache of that prefix, so only the task-B suffix runs per pair-order; the prefixes
are prefilled once and kept across batches, and the suffixes are batched by suffix length
across prefixes (prefix_plan.py). The split is taken from the full tokenisation (never
re-tokenised), so the cached path sees exactly the tokens of the plain path;
`tests/test_elicit_prefix.py` checks both give the same log-probabilities. The plan runs only
when it processes fewer tokens than the plain one, padding included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from llmlab.chat import (
    Message,
    content_span,
    padded_tokens,
    render,
    token_budget_batches,
    tokenize_rendered,
)
from llmlab.generation import generate
from llmlab.models import LoadedModel, cache_keyword, unwrap
from llmlab.preferences.prefix_plan import (
    PrefixKV,
    PrefixPlan,
    plan_prefix_cache,
)
from llmlab.preferences.prompts import DEFAULT_TEMPLATE, check_template, parse_choice

__all__ = [
    "DEFAULT_TEMPLATE",
    "ChoiceScorer",
    "PairOrder",
    "Choice",
    "apply_min_mass",
    "sample_choices",
]

PLAIN = "plain"  # full prompts, length-sorted batches
PREFIX_CACHE = "prefix_cache"  # each distinct prefix once, suffix batches by suffix length


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
    """Scores pair-orders with one model; reuse it for every call of a stage.

    prefix_cache_tokens caps the key/value states the prefix-cached plan holds, in tokens (a
    chunk's prefixes, and again one suffix batch's gathered context); see prefix_plan.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        template: str,
        batch_size: int = 32,
        prefix_cache: bool = True,
        max_tokens_per_batch: int = 8192,
        prefix_cache_tokens: int = 32768,
    ) -> None:
        check_template(template)
        if prefix_cache_tokens < 1:
            raise ValueError(f"prefix_cache_tokens must be >= 1, got {prefix_cache_tokens}")
        self.loaded = loaded
        self.template = template
        self.batch_size = batch_size
        self.prefix_cache = prefix_cache
        self.max_tokens = max_tokens_per_batch
        self.kv_tokens = prefix_cache_tokens
        self.a_ids, self.b_ids = choice_token_ids(loaded.tokenizer)
        # The forward's cache argument, looked up once (an inspect.signature call per batch).
        self.cache_arg = cache_keyword(loaded.model)
        # For throughput reports: pair-orders scored, real tokens run through the model, and
        # tokens processed including padding; pair-orders per plan and the last call's plan.
        self.n_orders = 0
        self.n_forward_tokens = 0
        self.n_padded_tokens = 0
        self.plan_orders: dict[str, int] = {PLAIN: 0, PREFIX_CACHE: 0}
        self.last_plan: str | None = None

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

        With prefix_cache, both plans are laid out first and the prefix-cached one runs only
        when it processes fewer tokens, padding included, than plain full-prompt batches
        (sharing pays only when task As repeat within a call); `last_plan` says which ran.
        """
        encoded = [self.encode(o) for o in orders]
        if not encoded:
            return []
        plain = self._plain_batches(encoded)
        out: list[Choice]
        plan = self.plan_prefix_cache(encoded) if self.prefix_cache else None
        lengths = [len(e.ids) for e in encoded]
        if plan is not None and plan.processed_tokens < padded_tokens(lengths, plain):
            out = self._run_prefix_plan(encoded, plan)
            self.last_plan = PREFIX_CACHE
        else:
            slots: list[Choice | None] = [None] * len(encoded)
            for rows in plain:
                for i, c in zip(rows, self._run_plain([encoded[i] for i in rows]), strict=True):
                    slots[i] = c
            out = [c for c in slots if c is not None]
            self.last_plan = PLAIN
        self.plan_orders[self.last_plan] += len(encoded)
        self.n_orders += len(encoded)
        return out

    def _plain_batches(self, encoded: Sequence[_Encoded]) -> list[list[int]]:
        """Return length-sorted row batches capped by rows and padded tokens."""
        return token_budget_batches([len(e.ids) for e in encoded], self.batch_size, self.max_tokens)

    def plan_prefix_cache(self, encoded: Sequence[_Encoded]) -> PrefixPlan:
        """Return the prefix-cached plan for encoded pair-orders (not run)."""
        return plan_prefix_cache(
            [e.ids[: e.split] for e in encoded],
            [len(e.ids) - e.split for e in encoded],
            self.batch_size,
            self.max_tokens,
            self.kv_tokens,
        )

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
    def _run_prefix_plan(self, encoded: Sequence[_Encoded], plan: PrefixPlan) -> list[Choice]:
        """Return Choices (in row order) running every prefix once, then suffixes by length."""
        out: list[Choice | None] = [None] * len(plan.row_prefix)
        for chunk in plan.chunks:
            store = PrefixKV(plan.prefixes, chunk.prefixes)
            for pids in chunk.prefill:
                self._prefill(plan, pids, store)
            for rows in chunk.suffix:
                choices = self._run_suffixes(encoded, plan, rows, store)
                for i, c in zip(rows, choices, strict=True):
                    out[i] = c
            del store  # the chunk's states go before the next chunk's are allocated
        return [c for c in out if c is not None]

    def _prefill(self, plan: PrefixPlan, pids: Sequence[int], store: PrefixKV) -> None:
        """Run a batch of prefixes (right padding) and keep their key/value states."""
        dev = self.loaded.device
        width = max(plan.prefix_len(p) for p in pids)
        ids = torch.full((len(pids), width), self.loaded.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, p in enumerate(pids):
            ids[k, : plan.prefix_len(p)] = torch.tensor(plan.prefixes[p])
            mask[k, : plan.prefix_len(p)] = 1
        # A cache of plain full-length layers whatever the model's own default: a sliding-window
        # layer would keep only the last columns, which are padding for the shorter rows.
        cache = DynamicCache()
        self.loaded.model(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=torch.arange(width).expand(len(pids), width).to(dev),
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_arg: cache},
        )
        store.add(pids, [(layer.keys, layer.values) for layer in cache.layers])
        self.n_forward_tokens += int(mask.sum())
        self.n_padded_tokens += mask.numel()

    def _run_suffixes(
        self, encoded: Sequence[_Encoded], plan: PrefixPlan, rows: Sequence[int], store: PrefixKV
    ) -> list[Choice]:
        """Return Choices for a suffix batch, each row attending to its own cached prefix.

        The context is left-padded so every prefix ends at the same column and its suffix
        follows without a gap; the padded columns are masked out, and positions are explicit
        (prefix length + offset), since a row's column is not its position.
        """
        dev = self.loaded.device
        pids = [plan.row_prefix[i] for i in rows]
        index, ctx_mask = store.context_mask(pids)
        # Built from per-layer tensors by the library's constructor, as llmlab.prefill builds
        # its merged cache; no config, so every layer is a plain full-length one (see _prefill).
        cache = DynamicCache(store.gather(index))
        width = max(plan.suffix_len[i] for i in rows)
        ids = torch.full((len(rows), width), self.loaded.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        suffix_start = torch.tensor([plan.prefix_len(p) for p in pids])
        for k, i in enumerate(rows):
            suffix = encoded[i].ids[encoded[i].split :]
            ids[k, : len(suffix)] = torch.tensor(suffix)
            mask[k, : len(suffix)] = 1
        positions = suffix_start[:, None] + torch.arange(width)[None, :]
        last = mask.sum(-1) - 1
        self.n_forward_tokens += int(mask.sum())
        self.n_padded_tokens += mask.numel()
        with _last_hidden_only(self.loaded.model, last):
            logits = self.loaded.model(
                input_ids=ids.to(dev),
                attention_mask=torch.cat([ctx_mask.long(), mask], dim=1).to(dev),
                position_ids=positions.to(dev),
                use_cache=True,
                **{self.cache_arg: cache},
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
