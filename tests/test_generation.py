"""Batched generation: order restored, seeded sampling reproducible, stop strings, padding."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmlab.generation import (
    auto_token_budget,
    bytes_per_generated_token,
    generate,
    repeat_for_samples,
    truncate_at_stop,
)

PROMPTS = [
    [{"role": "user", "content": "Say hello."}],
    [{"role": "user", "content": "Write a long sentence about the history of tea in Europe."}],
    [{"role": "user", "content": "Count to three."}],
]


def test_greedy_batched_equals_one_by_one(tiny_models):
    loaded = tiny_models["llama"]
    batched = generate(loaded, PROMPTS, max_new_tokens=6, batch_size=3, progress=False)
    singles = [
        generate(loaded, [p], max_new_tokens=6, batch_size=1, progress=False)[0] for p in PROMPTS
    ]
    assert batched == singles


def test_seeded_sampling_is_reproducible_and_varies_with_seed(tiny_models):
    loaded = tiny_models["qwen2"]
    convs = repeat_for_samples(PROMPTS, 3)
    a = generate(loaded, convs, max_new_tokens=8, temperature=1.0, seed=1, progress=False)
    b = generate(loaded, convs, max_new_tokens=8, temperature=1.0, seed=1, progress=False)
    c = generate(loaded, convs, max_new_tokens=8, temperature=1.0, seed=2, progress=False)
    assert a == b and a != c
    assert len(a) == 9


def test_stop_strings_truncate():
    assert truncate_at_stop("abc<END> tail", ["<END>"]) == "abc"
    assert truncate_at_stop("a.b!c", ["!", "."]) == "a"
    assert truncate_at_stop("none", ["x"]) == "none"


def test_real_model_answers_sensibly(smol):
    out = generate(
        smol,
        [[{"role": "user", "content": "What is the capital of France?"}]],
        max_new_tokens=12,
        progress=False,
    )
    assert "Paris" in out[0]


def test_bytes_per_generated_token_of_the_8b_shape():
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    # KV: 2 x 32 layers x 8 heads x 128 x 2 bytes; prefill transient: (3 x 14336 + 4 x 4096) x 2
    assert bytes_per_generated_token(model) == 131072 + 118784


def test_auto_budget_off_cuda_is_the_default_budget(tiny_models):
    loaded = tiny_models["llama"]
    assert auto_token_budget(loaded) is None
    auto = generate(loaded, PROMPTS, max_new_tokens=5, max_tokens_per_batch="auto", progress=False)
    assert auto == generate(loaded, PROMPTS, max_new_tokens=5, progress=False)
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        generate(loaded, PROMPTS, max_tokens_per_batch="big", progress=False)


def test_auto_budget_resume_keeps_shards_whose_batches_match(
    tiny_models, tmp_path, monkeypatch, caplog
):
    import llmlab.generation as generation

    loaded = tiny_models["llama"]
    prompts = PROMPTS * 3
    reference = generate(loaded, prompts, max_new_tokens=4, batch_size=2, progress=False)
    work = tmp_path / "work"
    calls = []
    real_generate = loaded.model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "generate", counting)

    def run(budget: int) -> list[str]:
        monkeypatch.setattr(generation, "auto_token_budget", lambda _loaded: budget)
        return generate(
            loaded, prompts, max_new_tokens=4, batch_size=2, max_tokens_per_batch="auto",
            work_dir=work, progress=False,
        )  # fmt: skip

    assert run(10**6) == reference and len(calls) == 5
    # the same plan under another free-memory reading: every shard is reused
    with caplog.at_level("WARNING", logger="llmlab.generation"):
        assert run(10**7) == reference and len(calls) == 5
    assert "starting fresh" not in caplog.text
    # a budget that splits batches: the shards that no longer fit are generated again
    assert run(30) == reference and len(calls) > 5
