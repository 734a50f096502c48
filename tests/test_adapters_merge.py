"""Switching a LoRA model between merged finetuned weights and the exact base model.

A stage that runs a finetuned model and then its base (introspection's local judge) merges the
adapter for speed; the base pass must then see the loaded base weights bit for bit, and the
passes after it the same merged weights as before. peft's unmerge (W + BA - BA in bfloat16) gives
neither, which is what these tests tell apart.
"""

from __future__ import annotations

import pytest


def _lora(tiny_dirs, dtype):  # noqa: ANN001, ANN202
    import torch
    from conftest import make_params
    from peft import LoraConfig, get_peft_model

    from llmlab.models import load_model

    loaded = load_model(make_params(tiny_dirs["llama"]))
    model = loaded.model.to(dtype)
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero update, as after training
    peft.eval()
    return peft, ids, plain


def _weights(model):  # noqa: ANN001, ANN202
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_base_pass_on_kept_weights_is_exact_and_merge_comes_back_bit_for_bit(tiny_dirs) -> None:  # noqa: ANN001
    import torch

    from llmlab.adapters import adapter_merged, base_weights, merge_adapter

    peft, ids, plain = _lora(tiny_dirs, torch.bfloat16)
    loaded_weights = _weights(peft)
    merge_adapter(peft, keep_base=True)
    assert adapter_merged(peft)
    merged_weights = _weights(peft)
    with torch.no_grad():
        merged = peft(input_ids=ids).logits
        with base_weights(peft):
            assert not adapter_merged(peft)
            for n, w in _weights(peft).items():
                assert torch.equal(w, loaded_weights[n]), n
            base = peft(input_ids=ids).logits
        again = peft(input_ids=ids).logits
    assert adapter_merged(peft)
    for n, w in _weights(peft).items():
        assert torch.equal(w, merged_weights[n]), n
    torch.testing.assert_close(base, plain, rtol=0, atol=0)
    torch.testing.assert_close(again, merged, rtol=0, atol=0)
    assert (merged.float() - plain.float()).abs().max() > 1e-2  # the adapter changes the logits


def test_peft_unmerge_in_bf16_does_not_give_the_base_back(tiny_dirs) -> None:  # noqa: ANN001
    """Why base_weights keeps a copy: the round trip through peft's unmerge is not exact."""
    import torch

    peft, _, _ = _lora(tiny_dirs, torch.bfloat16)
    loaded_weights = _weights(peft)
    peft.merge_adapter()
    peft.unmerge_adapter()
    changed = [n for n, w in _weights(peft).items() if not torch.equal(w, loaded_weights[n])]
    assert changed, "unmerge gave every weight back exactly; the kept copy would be unneeded"


def test_base_pass_after_a_merge_without_kept_base_is_refused(tiny_dirs) -> None:  # noqa: ANN001
    import torch

    from llmlab.adapters import base_weights, merge_adapter

    peft, ids, plain = _lora(tiny_dirs, torch.float32)
    with torch.no_grad(), base_weights(peft):  # unmerged: the adapter is switched off
        torch.testing.assert_close(peft(input_ids=ids).logits, plain, rtol=0, atol=0)
    merge_adapter(peft)
    with pytest.raises(RuntimeError, match="kept no copy of the base weights"):
        with base_weights(peft):
            pass


def test_base_weights_of_a_plain_model_is_the_model(tiny_dirs) -> None:  # noqa: ANN001
    import torch
    from conftest import make_params

    from llmlab.adapters import base_weights
    from llmlab.models import load_model

    model = load_model(make_params(tiny_dirs["llama"])).model
    ids = torch.randint(3, 100, (1, 5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with base_weights(model):
            inside = model(input_ids=ids).logits
    torch.testing.assert_close(inside, before, rtol=0, atol=0)
