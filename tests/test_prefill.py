"""Length-sorted chunked prefill: the merged cache continues generate as one prefill would."""

from __future__ import annotations

import contextlib
import functools
import random

import pytest
import torch
from tiny_models import long_tail_prompts, sharp_tiny_llama
from transformers import AutoModelForCausalLM, LlamaConfig

import llmlab.generation as generation
import llmlab.prefill as prefill
from llmlab.generation import generate
from llmlab.prefill import (
    chunk_plan,
    length_sorted_prefill,
    merged_cache_supported,
    padded_tokens,
    prompt_lengths,
)

LENGTHS = [5, 300, 17, 120, 60, 250, 8, 33]
BUDGET = 400  # padded tokens per chunk: 4 chunks for LENGTHS


def sharp_llama(vocab_size: int = 300) -> torch.nn.Module:
    """Return a tiny random Llama (fp32, eager attention) whose outputs depend on positions.

    initializer_range 0.1 instead of 0.02: with the default the attention is so flat that
    shifted positions barely move the logits, and a wrong prefill could pass the tests.
    """
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.1,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def left_padded(lengths: list[int], vocab_size: int = 300, seed: int = 0):
    """Return (input_ids, attention_mask) of random prompts, left-padded like chat.collate."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, vocab_size, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


GREEDY = dict(
    max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
    return_dict_in_generate=True, output_logits=True,
)  # fmt: skip


def test_chunk_plan_is_length_sorted_under_the_budget_and_keeps_every_row():
    rng = random.Random(0)
    widths = [rng.choice([3, 40, 150, 600]) + rng.randint(0, 30) for _ in range(97)]
    for budget in (1, 100, 700, 4096, 10**6):
        chunks = chunk_plan(widths, budget)
        order = [i for c in chunks for i in c]
        assert sorted(order) == list(range(len(widths)))  # no row dropped or duplicated
        assert [widths[i] for i in order] == sorted(widths, reverse=True)
        for c in chunks:
            longest = max(widths[i] for i in c)
            assert len(c) == 1 or len(c) * longest <= budget
        for c in chunks[:-1]:
            # greedy: the next chunk's first row would have broken this chunk's budget
            assert (len(c) + 1) * max(widths[i] for i in c) > budget
    assert chunk_plan(widths, 10**6) == [sorted(range(97), key=lambda i: -widths[i])]
    assert chunk_plan([5, 900, 7], 100) == [[1], [2, 0]]  # a row over the budget stands alone
    assert padded_tokens([5, 900, 7], [[1], [2, 0]]) == 900 + 2 * 7


def test_merged_cache_continues_generate_like_one_prefill():
    """(a) same greedy tokens, (b) first-step logits within 1e-4, in fp32, over 4 chunks."""
    model = sharp_llama()
    ids, mask = left_padded(LENGTHS)
    widths = [n - 1 for n in LENGTHS]
    assert [len(c) for c in chunk_plan(widths, BUDGET)] == [1, 1, 3, 3]
    reference = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    cache = length_sorted_prefill(model, ids, mask, budget=BUDGET)
    assert cache is not None and cache.get_seq_length() == max(LENGTHS) - 1
    # cached columns left of a row's chunk are zeros (masked out), never another row's states
    short = LENGTHS.index(5)
    keys = cache.layers[0].keys[short]  # its chunk's widest row has 60 tokens: 59 cached
    assert keys[:, : max(LENGTHS) - 60].abs().sum() == 0 and keys[:, -4:].abs().sum() > 0
    got = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **GREEDY)
    assert torch.equal(got.sequences, reference.sequences)
    diff = (got.logits[0] - reference.logits[0]).abs().max().item()
    assert diff < 1e-4, diff


def test_mask_positions_are_what_makes_the_merged_cache_right(monkeypatch):
    """Negative control: a chunk forward numbered by cache position (no position_ids) gives
    other first-step logits on this model, so the test above would catch that mistake."""
    model = sharp_llama()
    ids, mask = left_padded(LENGTHS)
    reference = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    real_forward = model.forward

    @functools.wraps(real_forward)  # keeps the signature, which names the cache keyword
    def without_positions(*args, **kwargs):
        kwargs.pop("position_ids", None)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", without_positions)
    cache = length_sorted_prefill(model, ids, mask, budget=BUDGET)
    monkeypatch.setattr(model, "forward", real_forward)
    got = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **GREEDY)
    per_row = (got.logits[0] - reference.logits[0]).abs().amax(dim=-1)
    # rows padded within their chunk move; each chunk's widest row is unpadded and does not
    # (chunks by length: [300], [250], [120, 60, 33], [17, 8, 5])
    padded_in_chunk = [LENGTHS.index(n) for n in (60, 33, 8, 5)]
    widest = [LENGTHS.index(n) for n in (300, 250, 120, 17)]
    assert per_row[padded_in_chunk].min() > 1e-2, per_row
    assert per_row[widest].max() < 1e-4, per_row


def test_chunking_only_where_it_saves_padding():
    model = sharp_llama()
    ids, mask = left_padded([40, 38, 39, 40])  # similar lengths: one forward is as good
    assert length_sorted_prefill(model, ids, mask, budget=60) is None
    ids, mask = left_padded([40, 5])  # one chunk under the budget
    assert length_sorted_prefill(model, ids, mask, budget=10**6) is None
    ids, mask = left_padded([1])  # nothing before the last column
    assert length_sorted_prefill(model, ids, mask, budget=1) is None
    right = mask.flip(1)
    with pytest.raises(ValueError, match="attention_mask row 0 is not left-padded"):
        prompt_lengths(torch.tensor([[1, 1, 0]]))
    assert prompt_lengths(right) == [1]


def _record(loaded, monkeypatch, **kw) -> tuple[dict[tuple, list[int]], int]:
    """Run generate; return ({prompt ids: new token ids}, batches given a merged cache)."""
    monkeypatch.setattr(generation, "CHUNKED_PREFILL_DEVICES", ("cuda", "cpu"))
    got: dict[tuple, list[int]] = {}
    merged = []
    real_generate = loaded.model.generate
    real_prefill = prefill.length_sorted_prefill

    def recording(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        for row in range(ids.shape[0]):
            got[tuple(ids[row][mask[row] == 1].tolist())] = out[row, ids.shape[1] :].tolist()
        return out

    def spying(*args, **kwargs):
        cache = real_prefill(*args, **kwargs)
        merged.append(cache is not None)
        return cache

    monkeypatch.setattr(loaded.model, "generate", recording)
    monkeypatch.setattr(generation, "length_sorted_prefill", spying)
    generate(
        loaded,
        long_tail_prompts() * 2 if kw.get("temperature") else long_tail_prompts(),
        progress=False,
        **kw,
    )
    monkeypatch.setattr(loaded.model, "generate", real_generate)
    monkeypatch.setattr(generation, "length_sorted_prefill", real_prefill)
    return got, sum(merged)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_chunked_equals_unchunked(tiny_models, monkeypatch, temperature):
    """(a, c) through generate(): greedy and seeded sampling give the unchunked path's tokens.

    Sampling matches too: the prefill draws no random numbers (eval mode), each batch is seeded
    after it, and the first-step probabilities differ only at float rounding (fp32).
    """
    loaded = sharp_tiny_llama(tiny_models)
    kw = dict(max_new_tokens=8, min_new_tokens=8, batch_size=16, temperature=temperature, seed=3)
    monkeypatch.setattr(prefill, "PREFILL_CHUNK_TOKENS", 10**9)  # never chunks
    unchunked, merged = _record(loaded, monkeypatch, **kw)
    assert merged == 0 and len(unchunked) == 8
    monkeypatch.setattr(prefill, "PREFILL_CHUNK_TOKENS", 400)
    chunked, merged = _record(loaded, monkeypatch, **kw)
    assert merged == 1  # one batch, prefilled in chunks
    assert chunked == unchunked
    if temperature:  # the samples are random draws, not the greedy tokens
        greedy, _ = _record(loaded, monkeypatch, **{**kw, "temperature": 0.0})
        assert chunked != greedy


def test_fallbacks_prefill_in_one_forward(tiny_models, monkeypatch):
    """(d) steered, compiled and sliding-window (Gemma-3) batches never take the merged cache."""
    calls = []
    real_prefill = prefill.length_sorted_prefill
    monkeypatch.setattr(
        generation,
        "length_sorted_prefill",
        lambda *a, **k: calls.append(1) or real_prefill(*a, **k),
    )
    monkeypatch.setattr(prefill, "PREFILL_CHUNK_TOKENS", 400)
    llama = sharp_tiny_llama(tiny_models)
    kw = dict(max_new_tokens=4, batch_size=16, progress=False)
    reference = generate(llama, long_tail_prompts(), **kw)
    assert not calls  # CPU: one prefill forward per batch unless the device list names it
    monkeypatch.setattr(generation, "CHUNKED_PREFILL_DEVICES", ("cuda", "cpu"))
    assert generate(llama, long_tail_prompts(), **kw) == reference
    assert len(calls) == 1
    calls.clear()
    steered = generate(
        llama, long_tail_prompts(), steer=lambda rows, mask: contextlib.nullcontext(), **kw
    )
    compiled = generate(llama, long_tail_prompts(), decode="compiled", **kw)
    assert steered == reference and compiled == reference and not calls
    gemma = tiny_models["gemma3"]
    assert not merged_cache_supported(gemma.model)
    generate(gemma, long_tail_prompts(), **kw)
    assert not calls
    assert merged_cache_supported(tiny_models["qwen2"].model)
    assert merged_cache_supported(llama.model)
    assert not merged_cache_supported(llama.model, {"num_return_sequences": 2})
    assert not merged_cache_supported(llama.model, {"cache_implementation": "static"})
    assert merged_cache_supported(llama.model, {"min_new_tokens": 4, "num_beams": 1})
    llama.model.train()
    try:
        assert not merged_cache_supported(llama.model)  # dropout would draw random numbers
    finally:
        llama.model.eval()
