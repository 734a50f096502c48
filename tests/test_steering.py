"""Steering: scale 0 is exact, masks limit it to the prompt pass, prefill-only generate."""

from __future__ import annotations

import pytest
import torch

from llmlab.chat import collate, encode_chat
from llmlab.models import cache_keyword
from llmlab.steering import SteeringError, steer, unit


def _batch(loaded, text="The weather today is calm and bright."):
    enc = [encode_chat(loaded.tokenizer, [{"role": "user", "content": text}], chat=True)]
    return collate(enc, loaded.tokenizer.pad_token_id)


@torch.no_grad()
def test_scale_zero_leaves_logits_unchanged(tiny_models):
    loaded = tiny_models["llama"]
    b = _batch(loaded)
    ref = loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    v = torch.randn(loaded.hidden_size)
    with steer(loaded.layers, [0, 1], v, scale=0.0):
        out = loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert torch.equal(ref, out)
    with steer(loaded.layers, [1], v, scale=4.0):
        moved = loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert not torch.allclose(ref, moved)
    after = loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert torch.equal(ref, after)  # hooks removed on exit


@torch.no_grad()
def test_mask_equals_steered_cache_then_unsteered_question(tiny_models):
    loaded = tiny_models["qwen2"]
    ids = _batch(loaded).input_ids
    split = ids.shape[1] - 4  # context = first part, question = last 4 tokens
    v = unit(torch.randn(loaded.hidden_size)) * 8
    mask = torch.zeros_like(ids)
    mask[:, :split] = 1
    with steer(loaded.layers, [1], v, mask=mask):
        one_pass = loaded.model(input_ids=ids).logits[:, split:]
    with steer(loaded.layers, [1], v):
        ctx = loaded.model(input_ids=ids[:, :split], use_cache=True)
    kw = cache_keyword(loaded.model)
    two_pass = loaded.model(input_ids=ids[:, split:], **{kw: getattr(ctx, kw)}).logits
    torch.testing.assert_close(one_pass, two_pass, atol=1e-4, rtol=1e-4)
    # The question tokens are affected only through the cache: unsteered cache differs.
    plain = loaded.model(input_ids=ids).logits[:, split:]
    assert not torch.allclose(plain, one_pass, atol=1e-4)


@torch.no_grad()
def test_prefill_only_generate_steers_prompt_not_decode(tiny_models):
    loaded = tiny_models["gemma3"]
    b = _batch(loaded)
    v = torch.randn(loaded.hidden_size) * 10
    seen = []
    hook = loaded.layers[1].register_forward_hook(
        lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o)
    )
    try:
        with steer(loaded.layers, [0], v, prefill_only=True):
            loaded.model.generate(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=loaded.tokenizer.pad_token_id,
            )
    finally:
        hook.remove()
    assert seen[0].shape[1] == b.input_ids.shape[1] and all(s.shape[1] == 1 for s in seen[1:])


def test_per_row_vectors_and_width_errors(tiny_models):
    loaded = tiny_models["llama"]
    enc = [
        encode_chat(loaded.tokenizer, [{"role": "user", "content": t}], chat=True)
        for t in ("One two three.", "One two three.")
    ]
    b = collate(enc, loaded.tokenizer.pad_token_id)
    vecs = torch.stack([torch.zeros(loaded.hidden_size), torch.randn(loaded.hidden_size) * 5])
    with torch.no_grad(), steer(loaded.layers, [1], vecs, scale=torch.tensor([1.0, 1.0])):
        out = loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    with torch.no_grad():
        ref = loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert torch.equal(out[0], ref[0]) and not torch.allclose(out[1], ref[1])
    with pytest.raises(SteeringError, match="width"):
        with torch.no_grad(), steer(loaded.layers, [0], torch.ones(7)):
            loaded.model(input_ids=b.input_ids)
    with pytest.raises(SteeringError, match="zero vector"):
        unit(torch.zeros(3))
