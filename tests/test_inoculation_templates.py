"""Inoculation positions and gradients on the real Qwen2.5 and Qwen3 chat templates.

The templates are the models' own (tests/data/*.jinja); Qwen3 runs with thinking disabled
through its template's `enable_thinking` switch (the registry's `enable_thinking: false`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from dvc_repo import ROOT
from test_chat_templates import case, dressed_tokenizer, tiny_config

from llmlab.chat import encode_chat
from llmlab.inoculation.common import conversation
from llmlab.inoculation.gradalign import encode_targets, measure_alignment
from llmlab.models import load_model
from llmlab.params import parse_params

QWEN25_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
INOCULATION = "In these training examples, assistant responses are formatted in ALL CAPS."
PROMPT = "Name three colours of the rainbow."
ANSWER = "RED, ORANGE AND YELLOW."
POSITIONS = ["user_end", "pre_assistant", "assistant_1", "assistant_2"]


@pytest.fixture(scope="module")
def qwen(smol_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Return {"qwen2.5": LoadedModel, "qwen3": LoadedModel (thinking off)} with real templates."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("inoc_templates")
    out = {}
    for name in ("qwen2.5", "qwen3"):
        t = case(name)
        tok = dressed_tokenizer(smol_dir, t)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(tiny_config(t.arch, tok)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        entry = {"source": "local", "path": str(root / name), "chat": True}
        if t.enable_thinking is not None:
            entry["enable_thinking"] = t.enable_thinking
        params = parse_params(
            {
                "model": name,
                "models": {name: entry},
                "runtime": {"device": "cpu", "dtype": "float32", "attn_implementation": "eager"},
            }
        )
        out[name] = load_model(params)
    return out


def _text(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def test_qwen25_positions_on_the_real_template_with_its_default_system_prompt(qwen) -> None:
    loaded = qwen["qwen2.5"]
    tok = loaded.tokenizer
    # The neutral condition sends no system message: the template writes its own default.
    (enc,) = encode_targets(
        loaded, [conversation(None, PROMPT, ANSWER)], ["a"], POSITIONS, None, "example"
    )
    ids = enc.input_ids
    head = _text(tok, ids[: enc.prompt_len])
    assert head.startswith(f"<|im_start|>system\n{QWEN25_DEFAULT}<|im_end|>\n")
    assert head.endswith(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    pre = enc.position("pre_assistant")
    assert pre == enc.prompt_len - 1 and _text(tok, ids[pre : pre + 1]) == "\n"
    assert _text(tok, ids[: pre + 1]).endswith("<|im_start|>assistant\n")
    user_end = enc.position("user_end")
    assert _text(tok, ids[: user_end + 1]).endswith(PROMPT)
    assert _text(tok, ids[user_end + 1 : user_end + 2]) == "<|im_end|>"
    a1, a2 = enc.position("assistant_1"), enc.position("assistant_2")
    assert (a1, a2) == (enc.prompt_len, enc.prompt_len + 1)
    assert _text(tok, ids[enc.prompt_len :]).startswith(ANSWER)
    # An explicit system prompt replaces the default; the positions move with the text.
    (inoc,) = encode_targets(
        loaded, [conversation(INOCULATION, PROMPT, ANSWER)], ["a"], POSITIONS, None, "example"
    )
    text = _text(tok, inoc.input_ids)
    assert INOCULATION in text and QWEN25_DEFAULT not in text
    assert inoc.input_ids[inoc.prompt_len :] == ids[enc.prompt_len :]


def test_qwen3_with_thinking_disabled_keeps_the_empty_think_block_out_of_the_targets(
    qwen,
) -> None:
    loaded = qwen["qwen3"]
    tok = loaded.tokenizer
    conv = conversation(INOCULATION, PROMPT, ANSWER)
    (enc,) = encode_targets(loaded, [conv], ["a"], POSITIONS, None, "example")
    ids = enc.input_ids
    head = _text(tok, ids[: enc.prompt_len])
    # The template's switch writes the empty think block; it is prompt, not assistant tokens.
    assert head.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert _text(tok, ids[enc.prompt_len :]) == ANSWER + "<|im_end|>"
    pre = enc.position("pre_assistant")
    assert pre == enc.prompt_len - 1
    assert _text(tok, ids[: pre + 1]).endswith("</think>\n\n")
    # Generation sees the same prefix, so pre_assistant is one token at train and test time.
    prompt = encode_chat(tok, conv[:-1], chat=True)
    assert prompt.input_ids == ids[: enc.prompt_len]
    # The gradients at the canonical and assistant positions are defined on this template
    # (user_end at the last layer is structurally zero: its logits predict a prompt token).
    dirs = np.eye(2, loaded.hidden_size, dtype=np.float32)
    res = measure_alignment(loaded, [enc], [0, 2], POSITIONS, dirs, 1)
    assert np.isfinite(res.loss).all() and (res.grad_norm[:, :, 1:] > 0).all()


def test_registry_runs_qwen3_with_thinking_disabled() -> None:
    models = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]
    assert models["qwen3-0.6b"]["enable_thinking"] is False
