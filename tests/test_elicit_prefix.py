"""Prefix-cached elicitation: the plan's layout, its exactness against full prompts, the chooser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmlab.chat import padded_tokens
from llmlab.models import LoadedModel
from llmlab.preferences.elicit import PLAIN, PREFIX_CACHE, Choice, ChoiceScorer, PairOrder
from llmlab.preferences.prefix_plan import plan_prefix_cache
from llmlab.preferences.prompts import DEFAULT_TEMPLATE

# Task lengths from a few words to a paragraph, so prefixes and suffixes vary a lot in length.
TASKS = [
    "Write a haiku.",
    "List the first 200 prime numbers, one per line, and mark the twin primes.",
    "Explain how a refrigerator keeps food cold, covering the compressor, the condenser, the "
    "expansion valve and the evaporator, and why the coils at the back feel warm.",
    "Summarise Romeo and Juliet.",
    "Write a Python function that reverses a string without slicing, with a docstring and "
    "three doctests.",
    "Plan a week of vegetarian dinners for two people on a tight budget.",
]


def all_orders() -> list[PairOrder]:
    """Every task A against every other task B; every third order has a system prompt."""
    out = []
    for a in range(len(TASKS)):
        for b in range(len(TASKS)):
            if a != b:
                system = "You are terse." if (a + 2 * b) % 3 == 0 else None
                out.append(PairOrder(TASKS[a], TASKS[b], system))
    return out


def log_probs(choices: list[Choice]) -> np.ndarray:
    """Return [n, 2] log p(A-tokens), log p(B-tokens) recovered from Choices."""
    p = np.array([c.p_first for c in choices], dtype=np.float64)
    m = np.array([c.mass for c in choices], dtype=np.float64)
    return np.log(np.stack([p * m, (1 - p) * m], axis=1))


@pytest.fixture(scope="module")
def sharp_llama(tiny_models) -> LoadedModel:
    """A tiny random Llama whose weights are large enough for attention to be position-sharp.

    With the default initialisation (std 0.02) attention is nearly uniform, so a wrong
    position or a leaked padded column moves log-probabilities by only ~1e-4; at std 0.1 a
    relative position shift of 3 moves them by ~0.4 while float noise stays ~1e-6.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = tiny_models["llama"].tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    return LoadedModel(model, tok, "sharp-llama", True, 2, 64, torch.device("cpu"), torch.float32)


def test_plan_layout_by_hand() -> None:
    # prefixes A (6 tokens), B (5), C (4); rows as (prefix, suffix length)
    a, b, c = tuple(range(100, 106)), tuple(range(200, 205)), tuple(range(300, 304))
    rows = [(a, 4), (a, 9), (b, 7), (b, 9), (c, 1), (c, 4), (a, 2)]
    prefixes, suffixes = [p for p, _ in rows], [s for _, s in rows]
    plan = plan_prefix_cache(prefixes, suffixes, batch_size=3, max_tokens=1000, kv_tokens=1000)
    assert plan.row_prefix == [0, 0, 1, 1, 2, 2, 0]
    assert len(plan.chunks) == 1
    assert plan.chunks[0].prefill == [[0, 1, 2]]
    # across prefixes, longest suffixes first (ties: longer prefix first)
    assert plan.chunks[0].suffix == [[1, 3, 2], [0, 5, 6], [4]]
    assert plan.processed_tokens == 3 * 6 + 3 * 9 + 3 * 4 + 1 == 58
    assert plan.real_tokens == 6 + 5 + 4 + sum(suffixes) == 51
    lengths = [len(p) + s for p, s in rows]
    assert padded_tokens(lengths, [[1, 3, 2], [0, 5, 6], [4]]) == 3 * 15 + 3 * 10 + 5

    # max_tokens caps rows x longest suffix in a suffix batch
    plan = plan_prefix_cache(prefixes, suffixes, batch_size=3, max_tokens=20, kv_tokens=1000)
    assert plan.chunks[0].suffix == [[1, 3], [2, 0], [5, 6, 4]]

    # kv_tokens caps the prefix tokens of a chunk (A, then B + C) and a batch's context
    plan = plan_prefix_cache(prefixes, suffixes, batch_size=3, max_tokens=1000, kv_tokens=10)
    assert [ch.prefixes for ch in plan.chunks] == [[0], [1, 2]]
    assert [ch.suffix for ch in plan.chunks] == [[[1], [0], [6]], [[3], [2], [5], [4]]]


def test_plan_invariants_on_a_random_workload() -> None:
    rng = np.random.default_rng(3)
    n_prefix = 40
    keys = [tuple(range(1000 * k, 1000 * k + int(n))) for k, n in
            enumerate(rng.integers(5, 80, n_prefix))]  # fmt: skip
    row_p = rng.integers(0, n_prefix, 600)
    suffixes = [int(s) for s in rng.integers(1, 60, 600)]
    batch_size, max_tokens, kv_tokens = 16, 500, 900
    plan = plan_prefix_cache([keys[p] for p in row_p], suffixes, batch_size, max_tokens, kv_tokens)
    assert len(plan.chunks) > 1
    prefilled = [p for ch in plan.chunks for p in ch.prefixes]
    assert sorted(prefilled) == list(range(len(plan.prefixes)))  # every prefix exactly once
    seen_rows = []
    for ch in plan.chunks:
        held = set(ch.prefixes)
        assert sum(plan.prefix_len(p) for p in held) <= kv_tokens or len(held) == 1
        for pids in ch.prefill:
            assert len(pids) <= batch_size
            assert len(pids) * max(plan.prefix_len(p) for p in pids) <= max_tokens
        widths = []
        for rows in ch.suffix:
            assert {plan.row_prefix[i] for i in rows} <= held
            w = max(suffixes[i] for i in rows)
            ctx = max(plan.prefix_len(plan.row_prefix[i]) for i in rows)
            assert len(rows) <= batch_size and len(rows) * w <= max_tokens
            assert len(rows) * (w + ctx) <= kv_tokens or len(rows) == 1
            widths += [suffixes[i] for i in rows]
            seen_rows += rows
        assert widths == sorted(widths, reverse=True)
    assert sorted(seen_rows) == list(range(600))
    # suffix padding is small once batches form by suffix length across prefixes
    suffix_padded = sum(
        len(rows) * max(suffixes[i] for i in rows) for ch in plan.chunks for rows in ch.suffix
    )
    assert suffix_padded < 1.1 * sum(suffixes)


def prefix_plan_exercises_every_case(scorer: ChoiceScorer, orders: list[PairOrder]):
    """Return (encoded, plan) after checking the plan has every case the exactness test needs."""
    encoded = [scorer.encode(o) for o in orders]
    plan = scorer.plan_prefix_cache(encoded)
    batches = [rows for ch in plan.chunks for rows in ch.suffix]
    row_batch = {i: k for k, rows in enumerate(batches) for i in rows}
    assert len(plan.chunks) >= 2
    # prefixes of different lengths in one suffix batch: left-padded context
    assert any(len({plan.prefix_len(plan.row_prefix[i]) for i in rows}) >= 2 for rows in batches)
    # suffixes of different lengths in one suffix batch: right-padded suffixes
    assert any(len({plan.suffix_len[i] for i in rows}) >= 2 for rows in batches)
    # a prefix whose rows fall into several suffix batches
    by_prefix: dict[int, set[int]] = {}
    for i, p in enumerate(plan.row_prefix):
        by_prefix.setdefault(p, set()).add(row_batch[i])
    assert any(len(ks) >= 2 for ks in by_prefix.values())
    # prefixes of different lengths in one prefill batch: right-padded prefill
    assert any(
        len({plan.prefix_len(p) for p in pids}) >= 2 for ch in plan.chunks for pids in ch.prefill
    )
    return encoded, plan


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_plan_log_probs_equal_full_prompts(sharp_llama, attn: str) -> None:
    sharp_llama.model.set_attn_implementation(attn)
    try:
        orders = all_orders()
        plain = ChoiceScorer(sharp_llama, DEFAULT_TEMPLATE, batch_size=5, prefix_cache=False)
        want = log_probs(plain.p_first(orders))
        scorer = ChoiceScorer(sharp_llama, DEFAULT_TEMPLATE, batch_size=3, prefix_cache_tokens=400)
        encoded, plan = prefix_plan_exercises_every_case(scorer, orders)
        got = log_probs(scorer._run_prefix_plan(encoded, plan))
    finally:
        sharp_llama.model.set_attn_implementation("sdpa")
    assert np.isfinite(want).all() and want.std() > 0.1  # choices differ across orders
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert scorer.n_forward_tokens == plan.real_tokens
    assert scorer.n_padded_tokens == plan.processed_tokens


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_prefix_plan_matches_full_prompts_on_other_architectures(tiny_models, arch: str) -> None:
    # Gemma3's sliding-window layers (window 64, shorter than these prompts) and Qwen2's
    # default system turn go through the same cache layout.
    loaded = tiny_models[arch]
    orders = all_orders()
    plain = ChoiceScorer(loaded, DEFAULT_TEMPLATE, batch_size=5, prefix_cache=False)
    want = log_probs(plain.p_first(orders))
    scorer = ChoiceScorer(loaded, DEFAULT_TEMPLATE, batch_size=3, prefix_cache_tokens=400)
    encoded, plan = prefix_plan_exercises_every_case(scorer, orders)
    assert max(len(e.ids) for e in encoded) > 64
    got = log_probs(scorer._run_prefix_plan(encoded, plan))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_chooser_takes_prefix_cache_when_prefixes_repeat(sharp_llama) -> None:
    # three long task As, each against many task Bs: the shared prefixes dominate
    long_as = [TASKS[2], TASKS[4], TASKS[1] + " " + TASKS[5]]
    orders = [PairOrder(a, b) for a in long_as for b in TASKS if b != a]
    plain = ChoiceScorer(sharp_llama, DEFAULT_TEMPLATE, batch_size=8, prefix_cache=False)
    cached = ChoiceScorer(sharp_llama, DEFAULT_TEMPLATE, batch_size=8)
    want = log_probs(plain.p_first(orders))
    got = log_probs(cached.p_first(orders))
    assert plain.last_plan == PLAIN and cached.last_plan == PREFIX_CACHE
    assert cached.plan_orders == {PLAIN: 0, PREFIX_CACHE: len(orders)}
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert cached.n_padded_tokens < 0.8 * plain.n_padded_tokens
    assert cached.n_orders == plain.n_orders == len(orders)


def test_chooser_takes_plain_when_nothing_is_shared(sharp_llama) -> None:
    # every task A shown once: a prefix pass plus a suffix pass can only add padding
    orders = [PairOrder(TASKS[a], TASKS[(a + 1) % len(TASKS)]) for a in range(len(TASKS))]
    plain = ChoiceScorer(sharp_llama, DEFAULT_TEMPLATE, batch_size=4, prefix_cache=False)
    cached = ChoiceScorer(sharp_llama, DEFAULT_TEMPLATE, batch_size=4)
    encoded = [cached.encode(o) for o in orders]
    lengths = [len(e.ids) for e in encoded]
    plan = cached.plan_prefix_cache(encoded)
    assert plan.processed_tokens >= padded_tokens(lengths, cached._plain_batches(encoded))
    a = plain.p_first(orders)
    b = cached.p_first(orders)
    assert cached.last_plan == PLAIN and cached.plan_orders == {PLAIN: len(orders), PREFIX_CACHE: 0}
    assert a == b  # the very same forward passes
    assert cached.n_padded_tokens == plain.n_padded_tokens


def test_prefix_cache_tokens_must_be_positive(sharp_llama) -> None:
    with pytest.raises(ValueError, match="prefix_cache_tokens must be >= 1, got 0"):
        ChoiceScorer(sharp_llama, DEFAULT_TEMPLATE, prefix_cache_tokens=0)
