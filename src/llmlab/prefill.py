"""Length-sorted chunked prefill: a generation batch's KV cache without prefilling its padding.

A generation batch is left-padded to its longest prompt, so one prefill forward over the whole
batch computes every row at the longest row's width. Evaluation prompts have a long-tailed
length mix: the first memory-sized batch of the 8B benchmark was 256 rows x 830 tokens (212k
prefill tokens) for rows whose median is near 120 tokens, and prefill is compute-bound, so about
half of the generation time went to padding (benchmarks/RESULTS.md, 2026-12-06).

Here the batch's rows are prefilled in chunks of similar length instead, each chunk padded only
to its own longest prompt, and the chunks' keys and values are copied right-aligned into one
cache for the whole batch. transformers' `generate`, given the full batch's input_ids and
attention mask with that cache, sees W - 1 cached positions for inputs of width W and runs only
the last column before decoding all rows together (one set of decode steps per batch, as before).

Positions: `generate` gives a left-padded row the positions cumsum(mask) - 1 (padding at 0);
a forward without position_ids would number the chunk's columns from 0 instead (cache
positions), which shifts every row padded within its chunk. The chunk forward therefore passes
the mask-derived positions, which equal the full batch's because the columns cut off on the left
are padding for every row of the chunk. Cached columns left of a chunk's width stay zero; the full
attention mask masks them out, as it masks the padding the unchunked prefill computed there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llmlab.chat import padded_tokens, token_budget_batches
from llmlab.models import cache_keyword, unwrap

# Padded prefill tokens per chunk forward. On the Llama-3.1-8B shape a forward of 16k tokens is
# matmuls of 16k rows, well past the few thousand that keep an H100's tensor cores busy, so fewer,
# larger chunks would not prefill faster; its transient (the chunk's own KV, 128 KiB a token, and
# the MLP activations, about 86 KiB a token in bf16) is under 4 GiB, small beside a memory-sized
# batch's cache. Smaller chunks would also pad less, but the sorted rows of one chunk already
# differ little in length.
PREFILL_CHUNK_TOKENS = 16384

# Chunk only when the batch's padded prefill tokens exceed the chunks' by more than this share:
# below it the saving does not pay for the extra forwards and the copy into the merged cache.
MIN_PADDING_SAVING = 0.10

# generate() keywords under which a merged cache for the batch's rows is not what generate needs:
# other caches or inputs, several sequences per row (the cache would need expanding), drafting.
CONFLICTING_GENERATE_KWARGS = frozenset({
    "cache", "past_key_values", "cache_implementation", "use_cache", "prefill_chunk_size",
    "position_ids", "inputs_embeds", "generation_config", "assistant_model",
    "prompt_lookup_num_tokens", "assistant_early_exit",
})  # fmt: skip


def merged_cache_supported(model: Any, generate_kwargs: dict[str, Any] | None = None) -> bool:
    """Return whether a length-sorted prefill can serve `model.generate` (else: unchunked path).

    Needs the cache `generate` itself builds for this model to be plain full attention in every
    layer (Llama, Qwen2, SmolLM2): sliding-window, chunked-attention, shared-KV or recurrent
    layers (Gemma-3, Gemma-3n, hybrids) keep states a right-aligned copy does not reproduce.
    Also needs eval mode (a training-mode forward may draw dropout masks, which would move the
    sampling RNG), one sequence per row and no generate keyword that brings its own cache.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or model.training:
        return False
    kwargs = generate_kwargs or {}
    if CONFLICTING_GENERATE_KWARGS & set(kwargs):
        return False
    defaults = getattr(model, "generation_config", None)
    for key in ("num_beams", "num_return_sequences"):
        if (kwargs.get(key) or getattr(defaults, key, None) or 1) != 1:
            return False
    text = config.get_text_config(decoder=True)
    layers = DynamicCache(config=config).layers
    if len(layers) != int(text.num_hidden_layers):
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


def chunk_plan(widths: Sequence[int], budget: int) -> list[list[int]]:
    """Return the row chunks of a batch: rows sorted by width (longest first), greedily grouped
    while rows x the chunk's longest width stays within `budget`; a row wider than the budget
    is a chunk of its own. Every row is in exactly one chunk."""
    return token_budget_batches(widths, max(1, len(widths)), max(1, budget))


def prompt_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Return each row's real length of a left-padded mask; refuse any other layout."""
    width = attention_mask.shape[1]
    lengths = attention_mask.sum(dim=1)
    columns = torch.arange(width, device=attention_mask.device)
    expected = columns.unsqueeze(0) >= (width - lengths).unsqueeze(1)
    bad = (expected != attention_mask.bool()).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"prefill: attention_mask row {bad[0]} is not left-padded")
    out = [int(n) for n in lengths.tolist()]
    if 0 in out:
        raise ValueError(f"prefill: attention_mask row {out.index(0)} has no tokens")
    return out


@torch.no_grad()
def prefill_chunks(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    chunks: Sequence[Sequence[int]],
    lengths: Sequence[int] | None = None,
) -> Any:
    """Prefill all but the last column of a left-padded batch, chunk by chunk; return the cache.

    The result is a transformers DynamicCache holding W - 1 positions for all rows (W the batch
    width), from which `model.generate(input_ids=input_ids, attention_mask=attention_mask,
    <cache keyword>=cache)` continues. Each chunk's forward covers only its own longest prompt
    and keeps one position of logits. `lengths`: the rows' prompt_lengths, where the caller
    has them already.
    """
    from transformers import DynamicCache

    rows, width = input_ids.shape
    if lengths is None:
        lengths = prompt_lengths(attention_mask)
    base = unwrap(model)
    keyword = cache_keyword(model)
    cached = width - 1  # generate runs the last column itself
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for chunk in chunks:
        chunk_width = max(lengths[i] for i in chunk) - 1
        if chunk_width <= 0:  # one-token prompts: nothing before the last column
            continue
        index = torch.tensor(list(chunk), device=input_ids.device)
        start = cached - chunk_width
        ids = input_ids[index, start:cached]
        mask = attention_mask[index, start:cached]
        # generate's positions for left padding (see the module docstring)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=base.config)
        model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
            logits_to_keep=1, **{keyword: cache},
        )  # fmt: skip
        if not keys:
            # [rows, KV heads, W - 1, head size] per layer, zeros where no chunk writes
            for layer in cache.layers:
                shape_k = (rows, layer.keys.shape[1], cached, layer.keys.shape[3])
                shape_v = (rows, layer.values.shape[1], cached, layer.values.shape[3])
                keys.append(layer.keys.new_zeros(shape_k))
                values.append(layer.values.new_zeros(shape_v))
        for merged_k, merged_v, layer in zip(keys, values, cache.layers, strict=True):
            merged_k[index, :, start:] = layer.keys
            merged_v[index, :, start:] = layer.values
        del cache
    if not keys:
        raise ValueError("prefill: no row has a token before the last column")

    def layer_states():
        # handed over one layer at a time, so each merged tensor is freed once the cache has
        # taken its copy: the peak is the merged cache plus one layer, not twice the cache
        while keys:
            yield keys.pop(0), values.pop(0)

    return DynamicCache(layer_states(), config=base.config)


def length_sorted_prefill(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    budget: int | None = None,
) -> Any | None:
    """Return a merged prefill cache for the batch, or None where chunking would not pay.

    None when the batch has a single chunk under `budget` padded tokens (PREFILL_CHUNK_TOKENS
    by default) or the chunks save at most MIN_PADDING_SAVING of its padded prefill tokens;
    the caller then lets `generate` prefill the batch in one forward. The caller checks
    merged_cache_supported first.
    """
    rows, width = input_ids.shape
    if width < 2:
        return None
    lengths = prompt_lengths(attention_mask)
    widths = [n - 1 for n in lengths]
    chunks = chunk_plan(widths, PREFILL_CHUNK_TOKENS if budget is None else budget)
    if len(chunks) < 2 or rows * (width - 1) <= (1 + MIN_PADDING_SAVING) * padded_tokens(
        widths, chunks
    ):
        return None
    return prefill_chunks(model, input_ids, attention_mask, chunks, lengths)
