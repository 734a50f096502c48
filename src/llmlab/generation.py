"""Batched generation: left-padded, length-grouped, seeded sampling or greedy, stop strings."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from llmlab.chat import Message, collate, encode_chat, token_budget_batches
from llmlab.models import LoadedModel

SteerFactory = Callable[[list[int], torch.Tensor], contextlib.AbstractContextManager[Any]]


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Return text cut at the earliest stop string (exclusive)."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def _eos_ids(loaded: LoadedModel) -> list[int]:
    ids = set()
    gen_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    for v in (loaded.tokenizer.eos_token_id, gen_eos):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return sorted(ids)


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    max_tokens_per_batch: int | None = 16384,
    stop_strings: Sequence[str] = (),
    steer: SteerFactory | None = None,
    progress: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """Return one completion per conversation, in input order.

    temperature 0 is greedy. Batches are grouped by prompt length (longest first) and each
    batch is seeded with seed + its index, so a re-run with the same inputs gives the same
    samples. `steer(rows, attention_mask)` may return a context manager (e.g. steering.steer
    with per-row vectors) entered around each batch's generate call. Extra keyword arguments
    go to `model.generate` unchanged.
    """
    tok = loaded.tokenizer
    encoded = [encode_chat(tok, conv, chat=loaded.chat) for conv in conversations]
    lengths = [len(e.input_ids) for e in encoded]
    budget = None if max_tokens_per_batch is None else max(1, max_tokens_per_batch)
    batches = token_budget_batches([n + max_new_tokens for n in lengths], batch_size, budget)
    eos = _eos_ids(loaded)
    outputs: list[str] = [""] * len(encoded)
    bar = tqdm(total=len(encoded), disable=not progress, desc="generate")
    for b, rows in enumerate(batches):
        batch = collate([encoded[i] for i in rows], tok.pad_token_id, padding_side="left").to(
            loaded.device
        )
        torch.manual_seed(seed + b)
        kwargs: dict[str, Any] = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos or None,
        )
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop_strings:
            kwargs.update(stop_strings=list(stop_strings), tokenizer=tok)
        ctx = steer(rows, batch.attention_mask) if steer else contextlib.nullcontext()
        with ctx:
            out = loaded.model.generate(**kwargs, **generate_kwargs)
        new = out[:, batch.input_ids.shape[1] :]
        for row, seq in zip(rows, new, strict=True):
            text = tok.decode(seq, skip_special_tokens=True)
            outputs[row] = truncate_at_stop(text, stop_strings).strip()
        bar.update(len(rows))
    bar.close()
    return outputs


def repeat_for_samples(
    conversations: Sequence[Sequence[Message]], n_samples: int
) -> list[Sequence[Message]]:
    """Return each conversation repeated n_samples times (sample j of item i at i*n + j)."""
    return [c for c in conversations for _ in range(n_samples)]
