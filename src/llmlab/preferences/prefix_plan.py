"""Prefix-cached scoring plan: each distinct prompt prefix runs once, suffixes batch by length.

Pair-orders showing the same task A (under the same system prompt) agree on their tokens up to
the end of task A. The plan prefills every distinct prefix once, keeps its key/value states,
and then runs the suffixes (task B, the template's tail, the assistant header) in batches
formed across prefixes by suffix length, each row attending to its own prefix's cached states.
A suffix batch's cache is left-padded to the batch's longest prefix; those padded positions
are masked out and cost attention reads only, never projections or MLPs, so the compute of a
suffix batch is its rows times its longest suffix.

Memory stays bounded by chunks: a group of prefixes (longest first) whose cached states fit
`kv_tokens`, then all of the suffixes of that group, then the next group. A suffix batch's
gathered context (rows x (longest prefix + longest suffix)) is capped by the same budget, so
at most about twice `kv_tokens` tokens of key/value states are held at once.

`PrefixPlan.processed_tokens` counts what the model runs including padding (prefill rows x
longest prefix, suffix rows x longest suffix); `llmlab.chat.padded_tokens` counts the same for
full prompts, and the scorer runs the cheaper of the two.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from llmlab.chat import padded_tokens, token_budget_batches

__all__ = ["PrefixChunk", "PrefixKV", "PrefixPlan", "plan_prefix_cache"]


@dataclass(frozen=True)
class PrefixChunk:
    """One group of prefixes held in memory together, and the work done with them."""

    prefill: list[list[int]]  # prefix ids per prefill batch, longest prefixes first
    suffix: list[list[int]]  # row ids per suffix batch, longest suffixes first, across prefixes

    @property
    def prefixes(self) -> list[int]:
        """Return the chunk's prefix ids in the order their states are stored."""
        return [p for batch in self.prefill for p in batch]


@dataclass(frozen=True)
class PrefixPlan:
    """Which prefix each row reads, the token counts, and the chunks in run order."""

    prefixes: list[tuple[int, ...]]  # distinct prefix token ids, by prefix id
    row_prefix: list[int]  # prefix id of each row
    suffix_len: list[int]  # suffix tokens of each row
    chunks: list[PrefixChunk]

    def prefix_len(self, pid: int) -> int:
        """Return the number of tokens of prefix `pid`."""
        return len(self.prefixes[pid])

    @property
    def processed_tokens(self) -> int:
        """Return the tokens the model runs, padding included (prefills and suffixes)."""
        prefix_lengths = [len(p) for p in self.prefixes]
        return sum(
            padded_tokens(prefix_lengths, chunk.prefill)
            + padded_tokens(self.suffix_len, chunk.suffix)
            for chunk in self.chunks
        )

    @property
    def real_tokens(self) -> int:
        """Return the tokens the model runs without padding: each prefix once, every suffix."""
        return sum(len(p) for p in self.prefixes) + sum(self.suffix_len)


def plan_prefix_cache(
    row_prefixes: Sequence[Sequence[int]],
    suffix_lengths: Sequence[int],
    batch_size: int,
    max_tokens: int,
    kv_tokens: int,
) -> PrefixPlan:
    """Return the plan for rows given as (prefix token ids, suffix length).

    batch_size caps the rows of every forward pass; max_tokens caps a pass's processed tokens
    (rows x longest prefix in a prefill, rows x longest suffix in a suffix batch); kv_tokens
    caps the prefix tokens held per chunk and a suffix batch's gathered context. A prefix
    longer than kv_tokens still runs, alone in its chunk.
    """
    if len(row_prefixes) != len(suffix_lengths):
        raise ValueError(
            f"row_prefixes has {len(row_prefixes)} rows but suffix_lengths {len(suffix_lengths)}"
        )
    if batch_size < 1 or max_tokens < 1 or kv_tokens < 1:
        raise ValueError(
            f"batch_size, max_tokens and kv_tokens must be >= 1, got "
            f"{batch_size}, {max_tokens}, {kv_tokens}"
        )
    ids: dict[tuple[int, ...], int] = {}
    row_prefix = [ids.setdefault(tuple(p), len(ids)) for p in row_prefixes]
    prefixes = list(ids)
    rows_of: list[list[int]] = [[] for _ in prefixes]
    for i, p in enumerate(row_prefix):
        rows_of[p].append(i)
    # Longest prefixes first: when the work spans several chunks, each holds prefixes of
    # similar length, so a suffix batch's context is padded to little more than its own.
    by_length = sorted(range(len(prefixes)), key=lambda p: (-len(prefixes[p]), p))
    groups: list[list[int]] = []
    held = 0
    for p in by_length:
        if groups and held + len(prefixes[p]) <= kv_tokens:
            groups[-1].append(p)
            held += len(prefixes[p])
        else:
            groups.append([p])
            held = len(prefixes[p])
    chunks = []
    for group in groups:
        lengths = [len(prefixes[p]) for p in group]
        prefill = [
            [group[k] for k in b] for b in token_budget_batches(lengths, batch_size, max_tokens)
        ]
        rows = [i for p in group for i in rows_of[p]]
        suffix = _suffix_batches(
            rows, row_prefix, prefixes, suffix_lengths, batch_size, max_tokens, kv_tokens
        )
        chunks.append(PrefixChunk(prefill, suffix))
    return PrefixPlan(prefixes, row_prefix, list(suffix_lengths), chunks)


def _suffix_batches(
    rows: list[int],
    row_prefix: Sequence[int],
    prefixes: Sequence[tuple[int, ...]],
    suffix_lengths: Sequence[int],
    batch_size: int,
    max_tokens: int,
    kv_tokens: int,
) -> list[list[int]]:
    """Return row batches sorted by suffix length across prefixes, capped by rows and tokens."""
    order = sorted(
        rows, key=lambda i: (-suffix_lengths[i], -len(prefixes[row_prefix[i]]), row_prefix[i], i)
    )
    batches: list[list[int]] = []
    current: list[int] = []
    width = context = 0
    for i in order:
        s, p = suffix_lengths[i], len(prefixes[row_prefix[i]])
        w, c = max(width, s), max(context, p)
        n = len(current) + 1
        if current and (n > batch_size or n * w > max_tokens or n * (c + w) > kv_tokens):
            batches.append(current)
            current, w, c = [], s, p
        current.append(i)
        width, context = w, c
    if current:
        batches.append(current)
    return batches


class PrefixKV:
    """Key/value states of one chunk's prefixes, packed token after token without padding.

    Per layer one tensor [tokens, kv_heads, head_dim]; `gather` builds a suffix batch's
    context from it, left-padded so every row's prefix ends at the same column.
    """

    def __init__(self, prefixes: Sequence[tuple[int, ...]], order: Sequence[int]) -> None:
        self.length = {p: len(prefixes[p]) for p in order}
        self.start: dict[int, int] = {}
        at = 0
        for p in order:
            self.start[p] = at
            at += self.length[p]
        self.n_tokens = at
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def add(self, pids: Sequence[int], layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store the states of a right-padded prefill batch ([rows, kv_heads, width, dim])."""
        lengths = torch.tensor([self.length[p] for p in pids])
        width = layers[0][0].shape[2]
        real = torch.arange(width)[None, :] < lengths[:, None]
        dest = torch.cat([
            torch.arange(self.start[p], self.start[p] + self.length[p]) for p in pids
        ])  # fmt: skip
        if not self.keys:
            for k, v in layers:
                shape = (self.n_tokens, k.shape[1], k.shape[3])
                self.keys.append(torch.empty(shape, dtype=k.dtype, device=k.device))
                self.values.append(torch.empty(shape, dtype=v.dtype, device=v.device))
        on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # layers may be spread
        for store_k, store_v, (k, v) in zip(self.keys, self.values, layers, strict=True):
            if k.device not in on:
                on[k.device] = real.to(k.device), dest.to(k.device)
            mask, where = on[k.device]
            # Boolean indexing walks rows in order, so each prefix's tokens land contiguously.
            store_k[where] = k.transpose(1, 2)[mask]
            store_v[where] = v.transpose(1, 2)[mask]

    def context_mask(self, pids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (store index [rows, width], real-token mask [rows, width]) for a batch.

        Row r's prefix fills the last len(prefix) columns; the padded columns point at token
        0 (any finite state will do: the mask keeps them out of attention).
        """
        lengths = torch.tensor([self.length[p] for p in pids])
        starts = torch.tensor([self.start[p] for p in pids])
        width = int(lengths.max())
        col = torch.arange(width)[None, :]
        pad = (width - lengths)[:, None]
        mask = col >= pad
        index = torch.where(mask, starts[:, None] + col - pad, torch.zeros_like(col))
        return index, mask

    def gather(self, index: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield each layer's context [rows, kv_heads, width, dim] for a store index."""
        on: dict[torch.device, torch.Tensor] = {}
        for k, v in zip(self.keys, self.values, strict=True):
            if k.device not in on:
                on[k.device] = index.to(k.device)
            where = on[k.device]
            yield k[where].transpose(1, 2), v[where].transpose(1, 2)
