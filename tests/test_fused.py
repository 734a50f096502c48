"""Compiled norms and MLPs give the eager values for capture and residual gradients."""

from __future__ import annotations

import pytest
import torch

from llmlab.activations import capture_batch
from llmlab.chat import collate, encode_chat
from llmlab.fused import compile_elementwise, restore_eager
from llmlab.gradients import residual_gradients

CONVS = [
    [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello there."}],
    [
        {"role": "user", "content": "Tell me about the sea and its tides, briefly."},
        {"role": "assistant", "content": "The moon pulls the water."},
    ],
]


def test_compiled_layers_match_eager(tiny_models):
    pytest.importorskip("torch._inductor")
    loaded = tiny_models["llama"]
    enc = [encode_chat(loaded.tokenizer, c, chat=loaded.chat) for c in CONVS]
    batch = collate(enc, loaded.tokenizer.pad_token_id, padding_side="right")
    layers = [0, 1]
    eager_acts = capture_batch(loaded, batch, layers, ["prompt_last"])
    eager_grads = residual_gradients(loaded, batch, layers, ["pre_assistant"])
    assert compile_elementwise(loaded.model) > 0
    try:
        acts = capture_batch(loaded, batch, layers, ["prompt_last"])
        grads = residual_gradients(loaded, batch, layers, ["pre_assistant"])
    finally:
        assert restore_eager(loaded.model) > 0
        torch._dynamo.reset()
    for key, ref in eager_acts.items():
        torch.testing.assert_close(acts[key], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads.loss, eager_grads.loss, atol=1e-5, rtol=1e-4)
    for key, ref in eager_grads.grads.items():
        torch.testing.assert_close(grads.grads[key], ref, atol=1e-5, rtol=1e-3)
