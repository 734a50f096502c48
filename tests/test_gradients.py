"""Residual gradients checked against plain autograd and finite differences."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from llmlab.chat import collate, encode_chat
from llmlab.gradients import alignment, per_example_loss, residual_gradients
from llmlab.hooks import layer_output, replace_output

CONVS = [
    [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "The sum is 5."},
    ],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a colour of the sky on a clear day."},
        {"role": "assistant", "content": "Blue."},
    ],
]


def _batch(loaded, side="left"):
    enc = [encode_chat(loaded.tokenizer, c, chat=True) for c in CONVS]
    return collate(enc, loaded.tokenizer.pad_token_id, padding_side=side)


def _loss_with_delta(loaded, conv, layer, pos_name, delta):
    enc = encode_chat(loaded.tokenizer, conv, chat=True)
    b = collate([enc], loaded.tokenizer.pad_token_id)
    pos = enc.position(pos_name)

    def hook(_m, _i, out):
        h = layer_output(out).clone()
        h[0, pos] += delta
        return replace_output(out, h)

    handle = loaded.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    finally:
        handle.remove()
    return per_example_loss(logits.double(), b.labels)[0][0].item()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gradient_matches_finite_difference(tiny_models, arch):
    # float64 copy: the finite difference needs more precision than fp32 gives.
    src = tiny_models[arch]
    loaded = dataclasses.replace(src, model=copy.deepcopy(src.model).double(), dtype=torch.float64)
    res = residual_gradients(
        loaded, _batch(loaded, "right"), [0, 1], ["pre_assistant", "assistant_1"]
    )
    torch.manual_seed(0)
    for row, conv in enumerate(CONVS):
        for layer in (0, 1):
            for pos in ("pre_assistant", "assistant_1"):
                v = torch.randn(loaded.hidden_size, dtype=torch.float64)
                eps = 1e-3
                fd = (
                    _loss_with_delta(loaded, conv, layer, pos, eps * v)
                    - _loss_with_delta(loaded, conv, layer, pos, -eps * v)
                ) / (2 * eps)
                analytic = float(res.grads[(layer, pos)][row].double() @ v)
                # Rotary embeddings run in fp32 even in a float64 model, which bounds the agreement.
                scale = float(res.grads[(layer, pos)][row].norm() * v.norm())
                assert abs(analytic - fd) <= 1e-3 * scale


def test_batched_gradients_equal_single_example_autograd(tiny_models):
    loaded = tiny_models["qwen2"]
    batched = residual_gradients(loaded, _batch(loaded, "right"), [1], ["pre_assistant"])
    for row, conv in enumerate(CONVS):
        enc = encode_chat(loaded.tokenizer, conv, chat=True)
        single = residual_gradients(loaded, collate([enc], 0), [1], ["pre_assistant"])
        torch.testing.assert_close(
            batched.grads[(1, "pre_assistant")][row],
            single.grads[(1, "pre_assistant")][0],
            atol=1e-5,
            rtol=1e-4,
        )
        assert batched.loss[row].item() == pytest.approx(single.loss[0].item(), rel=1e-5)
    # Parameters stay frozen-free afterwards (requires_grad restored) and hold no grads.
    assert all(p.grad is None for p in loaded.model.parameters())


def test_alignment_is_fp32_cosine():
    g = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.bfloat16)
    v = torch.tensor([1.0, 0.0], dtype=torch.bfloat16)
    a = alignment(g, v)
    assert a.cos.dtype == torch.float32
    torch.testing.assert_close(a.cos, torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(a.grad_norm, torch.tensor([5.0, 2.0]))
    ref = torch.nn.functional.cosine_similarity(g.double(), v.double().expand_as(g), dim=-1)
    torch.testing.assert_close(a.cos.double(), ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="width"):
        alignment(g, torch.ones(3))


def test_left_and_right_padding_give_the_same_gradients(tiny_models):
    loaded = tiny_models["llama"]
    right = residual_gradients(
        loaded, _batch(loaded, "right"), [0, 1], ["pre_assistant", "user_end"]
    )
    left = residual_gradients(loaded, _batch(loaded, "left"), [0, 1], ["pre_assistant", "user_end"])
    for key, g in right.grads.items():
        torch.testing.assert_close(left.grads[key], g, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(left.loss, right.loss)
