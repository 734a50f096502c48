"""The anchor's training pass: the steered context fills a KV cache without gradient.

One pass with the LoRA outputs detached on the context prefix must give the gradient of the
two-pass reference (cache under no_grad, question read with gradient), and the collators must
mark exactly each example's prefix.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llmlab.chat import encode_chat
from llmlab.introspection.conversation import detection_messages, reply_token_span
from llmlab.introspection.examples import training_examples
from llmlab.models import cache_keyword
from llmlab.training import LoraCollator, PackedCollator, no_grad_positions, prepare_examples

QUESTION = "Do you detect any unusual modifications to your internal activations?"


def _lora_model(loaded):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )  # fmt: skip
    return get_peft_model(copy.deepcopy(loaded.model), cfg)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_one_pass_with_a_no_grad_prefix_equals_the_cached_two_pass_gradient(tiny_models):
    loaded = tiny_models["llama"]
    model = _lora_model(loaded)
    msgs = detection_messages("Rivers run to the sea. Stones stay.", "Thank you.", QUESTION)
    ids = torch.tensor([encode_chat(loaded.tokenizer, msgs, chat=True).input_ids])
    _, n = reply_token_span(loaded.tokenizer, msgs, chat=True)
    target = torch.tensor([7])

    # Reference: the anchor's two passes.
    model.zero_grad()
    with torch.no_grad():
        cache = getattr(model(input_ids=ids[:, :n], use_cache=True), cache_keyword(model))
    out = model(input_ids=ids[:, n:], use_cache=True, **{cache_keyword(model): cache})
    torch.nn.functional.cross_entropy(out.logits[:, -1], target).backward()
    reference = _grads(model)

    model.zero_grad()
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[0, :n] = True
    with no_grad_positions(model, mask):
        logits = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(logits, out.logits[:, -1], atol=1e-4, rtol=1e-4)
    torch.nn.functional.cross_entropy(logits, target).backward()
    one_pass = _grads(model)
    assert reference.keys() == one_pass.keys() and reference
    for name in reference:
        torch.testing.assert_close(one_pass[name], reference[name], atol=1e-5, rtol=1e-4)

    # Without the mask the gradient also flows through the context's keys and values.
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, -1], target).backward()
    full = _grads(model)
    assert any(not torch.allclose(full[k], reference[k], atol=1e-5) for k in reference)


def test_collators_mark_each_examples_context_prefix(tiny_models):
    loaded = tiny_models["llama"]
    rows = [
        {
            "messages": detection_messages(c, "Thank you.", QUESTION, "The answer is yes"),
            "answer_prefix": "The answer is",
            "steer": None,
        }
        for c in ("Rivers run to the sea.", "A much longer context about stones and hills.")
    ]
    examples = training_examples(loaded, None, rows, context_gradient=False)
    prefixes = [reply_token_span(loaded.tokenizer, r["messages"], chat=True)[1] for r in rows]
    assert [e.no_grad_prefix for e in examples] == prefixes
    assert training_examples(loaded, None, rows)[0].no_grad_prefix is None
    feats = prepare_examples(loaded, examples, 256).features
    pad = loaded.tokenizer.pad_token_id
    padded = LoraCollator(pad, loaded.hidden_size)(feats)["no_grad_mask"]
    for row, n in enumerate(prefixes):
        assert padded[row].nonzero().flatten().tolist() == list(range(n))
    packed = PackedCollator(pad, loaded.hidden_size, 512)(feats)
    (mask_row,) = packed["no_grad_mask"]
    lengths = [len(f["input_ids"]) for f in feats]
    # Packed longest first: each example's prefix at its own offset.
    order = sorted(range(2), key=lambda i: -lengths[i])
    want, offset = [], 0
    for i in order:
        want += list(range(offset, offset + prefixes[i]))
        offset += lengths[i]
    assert mask_row.nonzero().flatten().tolist() == want


def test_no_grad_prefix_must_stay_in_the_prompt(tiny_models):
    from llmlab.training import TrainExample, TrainingError

    loaded = tiny_models["llama"]
    msgs = detection_messages("Rivers.", "Thank you.", QUESTION, "yes")
    n = len(encode_chat(loaded.tokenizer, msgs, chat=True).input_ids)
    with pytest.raises(TrainingError, match="no_grad_prefix"):
        prepare_examples(loaded, [TrainExample(msgs, loss_tokens=1, no_grad_prefix=n)], 256)
