"""Batched generation: order restored, seeded sampling reproducible, stop strings, padding."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import long_tail_prompts, sharp_tiny_llama
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


def _new_tokens_by_prompt(loaded, monkeypatch, **kw) -> dict[tuple, list[int]]:
    """Run generate; return {prompt token ids: generated token ids} of every row."""
    got: dict[tuple, list[int]] = {}
    real = loaded.model.generate

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        for row in range(ids.shape[0]):
            got[tuple(ids[row][mask[row] == 1].tolist())] = out[row, ids.shape[1] :].tolist()
        return out

    monkeypatch.setattr(loaded.model, "generate", recording)
    generate(loaded, PROMPTS * 2, progress=False, **kw)
    monkeypatch.setattr(loaded.model, "generate", real)
    return got


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_compiled_decode_greedy_rows_equal_eager(tiny_models, monkeypatch, arch):
    """Static cache per batch: every greedy row gives the eager path's tokens, in any batching.

    Compared as token ids (the tiny random models often emit special tokens, which decode to
    ""); gemma3 adds sliding-window layers to the static cache.
    """
    loaded = tiny_models[arch]
    kw = dict(max_new_tokens=8, min_new_tokens=8)
    eager = _new_tokens_by_prompt(loaded, monkeypatch, batch_size=4, **kw)
    compiled = _new_tokens_by_prompt(loaded, monkeypatch, batch_size=4, decode="compiled", **kw)
    singles = _new_tokens_by_prompt(loaded, monkeypatch, batch_size=1, decode="compiled", **kw)
    assert len(eager) == len(PROMPTS) and all(len(t) == 8 for t in eager.values())
    assert compiled == eager == singles


def test_compiled_decode_seeded_sampling_is_reproducible(tiny_models):
    """Each batch is seeded by (seed, batch index) under decode="compiled" too."""
    loaded = tiny_models["gemma3"]
    convs = repeat_for_samples(PROMPTS, 2)
    kw = dict(max_new_tokens=8, temperature=1.0, decode="compiled", batch_size=4, progress=False)
    a = generate(loaded, convs, seed=1, **kw)
    assert a == generate(loaded, convs, seed=1, **kw)
    assert a != generate(loaded, convs, seed=2, **kw)


def test_compiled_decode_traces_the_decode_step(tiny_models, monkeypatch):
    """With compilation forced on the CPU (dynamo, eager backend) the decode step is traced."""
    from transformers import CompileConfig

    loaded = tiny_models["gemma3"]
    config = CompileConfig(backend="eager", dynamic=True, mode=None)
    config._compile_all_devices = True
    compiled_calls = []
    real = loaded.model.get_compiled_call

    def spy(cfg):
        compiled_calls.append(cfg)
        return real(cfg)

    monkeypatch.setattr(loaded.model, "get_compiled_call", spy)
    eager = generate(loaded, PROMPTS, max_new_tokens=6, batch_size=2, progress=False)
    assert not compiled_calls
    compiled = generate(
        loaded, PROMPTS, max_new_tokens=6, batch_size=2, decode="compiled", progress=False,
        compile_config=config,
    )  # fmt: skip
    assert compiled == eager
    assert compiled_calls and all(c is config for c in compiled_calls)


def test_compiled_decode_keeps_stop_strings_and_shards(tiny_models, tmp_path):
    from llmlab.generation import saved_batches

    loaded = tiny_models["llama"]
    eager = generate(loaded, PROMPTS, max_new_tokens=8, progress=False)
    stop = eager[1][2:4]  # a stop string the greedy text contains
    expected = [truncate_at_stop(t, [stop]).strip() for t in eager]
    work = tmp_path / "work"
    got = generate(
        loaded, PROMPTS, max_new_tokens=8, batch_size=1, stop_strings=[stop],
        decode="compiled", work_dir=work, progress=False,
    )  # fmt: skip
    assert got == expected and saved_batches(work) == {0: 1, 1: 1, 2: 1}
    # a run with the other decode does not reuse these shards
    assert generate(
        loaded, PROMPTS, max_new_tokens=8, batch_size=1, stop_strings=[stop],
        work_dir=work, progress=False,
    ) == expected  # fmt: skip


def test_compiled_decode_refuses_steering_and_unknown_decodes(tiny_models):
    loaded = tiny_models["llama"]
    with pytest.raises(ValueError, match="steer: steering needs decode='eager'"):
        generate(loaded, PROMPTS, decode="compiled", steer=lambda rows, mask: None, progress=False)
    with pytest.raises(ValueError, match="decode must be one of"):
        generate(loaded, PROMPTS, decode="fast", progress=False)


def test_runtime_decode_applies_to_unsteered_calls_only(tiny_models, monkeypatch):
    """runtime.decode (carried on the loaded model) picks the decode of calls that name none;
    a steered call decodes eagerly instead of being refused or recompiled per batch."""
    from transformers import CompileConfig

    from llmlab.params import Runtime

    assert Runtime().decode == "eager"
    with pytest.raises(ValueError, match="decode"):
        Runtime(decode="fast")
    loaded = tiny_models["gemma3"]
    config = CompileConfig(backend="eager", dynamic=True, mode=None)
    config._compile_all_devices = True
    compiled_calls = []
    real = loaded.model.get_compiled_call
    monkeypatch.setattr(
        loaded.model, "get_compiled_call", lambda cfg: compiled_calls.append(cfg) or real(cfg)
    )
    eager = generate(loaded, PROMPTS, max_new_tokens=6, batch_size=2, progress=False)
    monkeypatch.setattr(loaded, "decode", "compiled")
    got = generate(
        loaded, PROMPTS, max_new_tokens=6, batch_size=2, progress=False, compile_config=config
    )
    assert got == eager and compiled_calls
    compiled_calls.clear()
    steered = generate(
        loaded, PROMPTS, max_new_tokens=6, batch_size=2, progress=False,
        steer=lambda rows, mask: contextlib.nullcontext(),
    )  # fmt: skip
    assert steered == eager and not compiled_calls


def test_generation_attention_leaves_out_cudnn_on_cuda_only() -> None:
    """cuDNN SDPA builds a plan per key length: every eager decode step paid one on Hopper."""
    from llmlab.generation import decode_attention

    before = (
        torch.backends.cuda.cudnn_sdp_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
    )
    assert before[0], "test assumes torch's default: cuDNN SDPA allowed"
    with decode_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
    with decode_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled()  # CPU: nothing changes
    after = (
        torch.backends.cuda.cudnn_sdp_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
    )
    assert after == before


@pytest.mark.parametrize("chunk_tokens", [400, 10**9])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_cache_decode_steps_equal_the_dynamic_cache(
    tiny_models, monkeypatch, chunk_tokens, temperature
):
    """The CUDA path's static cache and buffered decode step (GraphedDecode, run eagerly on the
    CPU) give the dynamic cache's tokens, greedy and seeded sampling, with the merged cache of a
    chunked prefill (400) and with generate's own prefill (never chunks)."""
    from llmlab import generation, prefill

    loaded = sharp_tiny_llama(tiny_models)
    monkeypatch.setattr(generation, "CHUNKED_PREFILL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(prefill, "PREFILL_CHUNK_TOKENS", chunk_tokens)
    prompts = long_tail_prompts() * (2 if temperature else 1)
    kw = dict(
        max_new_tokens=8, min_new_tokens=8, batch_size=5, temperature=temperature, seed=3,
        progress=False,
    )  # fmt: skip
    dynamic = generate(loaded, prompts, **kw)
    steps: list[tuple[int, int]] = []
    real_exit = generation.GraphedDecode.__exit__

    def spy_exit(self, *exc):
        steps.append((self.steps, len(self.inputs)))
        return real_exit(self, *exc)

    monkeypatch.setattr(generation.GraphedDecode, "__exit__", spy_exit)
    monkeypatch.setattr(generation, "GRAPHED_DECODE_DEVICES", ("cuda", "cpu"))
    static = generate(loaded, prompts, **kw)
    assert static == dynamic
    assert steps and all(n >= 7 and buffered > 0 for n, buffered in steps)
    assert "forward" not in loaded.model.__dict__  # the model's own forward is back


def test_static_cache_decode_keeps_stop_strings_and_shards(tiny_models, monkeypatch, tmp_path):
    from llmlab import generation

    loaded = sharp_tiny_llama(tiny_models)
    monkeypatch.setattr(generation, "CHUNKED_PREFILL_DEVICES", ("cuda", "cpu"))
    kw = dict(max_new_tokens=8, batch_size=3, progress=False)
    full = generate(loaded, long_tail_prompts(), **kw)
    stop = next((t[1:3] for t in full if len(t) > 3), "zz")
    monkeypatch.setattr(generation, "GRAPHED_DECODE_DEVICES", ("cuda", "cpu"))
    work = tmp_path / "work"
    got = generate(loaded, long_tail_prompts(), stop_strings=[stop], work_dir=work, **kw)
    assert got == [truncate_at_stop(t, [stop]).strip() for t in full]
    assert generate(loaded, long_tail_prompts(), stop_strings=[stop], work_dir=work, **kw) == got
