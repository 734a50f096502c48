"""Inoculation family: token positions against hand-checked indices for each tiny template."""

from __future__ import annotations

import pytest

from llmlab.chat import ChatError
from llmlab.inoculation.common import conversation
from llmlab.inoculation.gradalign import encode_targets
from llmlab.inoculation.smoke import position_report

CONV = conversation("Respond in ALL CAPS.", "Name a red fruit.", "A RED APPLE.")

# Indices read off the decoded token lists of each template (see the comments for the tokens).
HAND_CHECKED = {
    # ... ' fruit' '.'(23) '<|eot_id|>' '<|start_header_id|>' 'ass' 'istant' '<|end_header_id|>'
    # '\n\n'(29) 'A'(30) ' RED'(31) ' AP'(32)
    "llama": {"user_end": (23, "."), "pre_assistant": (29, "\n\n"), "assistant": [30, 31, 32]},
    # ... ' fruit' '.'(19) '<|im_end|>' '\n' '<|im_start|>' 'ass' 'istant' '\n'(25) 'A'(26) ...
    "qwen2": {"user_end": (19, "."), "pre_assistant": (25, "\n"), "assistant": [26, 27, 28]},
    # system text folded into the user turn: ... ' fruit' '.'(17) '<end_of_turn>' '\n'
    # '<start_of_turn>' 'model' '\n'(22) 'A'(23) ...
    "gemma3": {"user_end": (17, "."), "pre_assistant": (22, "\n"), "assistant": [23, 24, 25]},
}


@pytest.mark.parametrize("arch", sorted(HAND_CHECKED))
def test_positions_match_hand_checked_indices(tiny_models, arch: str) -> None:
    loaded = tiny_models[arch]
    rep = position_report(loaded, CONV, k=3)
    want = HAND_CHECKED[arch]
    pos = rep["positions"]
    assert (pos["user_end"]["index"], pos["user_end"]["token"]) == want["user_end"]
    assert (pos["pre_assistant"]["index"], pos["pre_assistant"]["token"]) == want["pre_assistant"]
    assert [pos[f"assistant_{k}"]["index"] for k in (1, 2, 3)] == want["assistant"]
    assert [pos[f"assistant_{k}"]["token"] for k in (1, 2, 3)] == ["A", " RED", " AP"]
    assert all(rep["checks"].values()), rep["checks"]


def test_positions_on_the_embedded_chatml_template(smol_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    from llmlab.chat import encode_chat

    enc = encode_chat(tok, CONV, chat=True)
    tokens = [tok.decode([t]) for t in enc.input_ids]
    # ... ' fruit' '.'(19) '<|im_end|>' '\n' '<|im_start|>' 'ass' 'istant' '\n'(25) 'A'(26) ' RED'(27) ...
    assert (enc.position("user_end"), tokens[19]) == (19, ".")
    assert (enc.position("pre_assistant"), tokens[25]) == (25, "\n")
    assert [enc.position(f"assistant_{k}") for k in (1, 2, 3)] == [26, 27, 28]
    assert tokens[23:25] == ["ass", "istant"] and tokens[26:28] == ["A", " RED"]


def test_missing_positions_are_clear_errors(tiny_models) -> None:
    loaded = tiny_models["llama"]
    short = conversation("sys", "Name a red fruit.", "OK")
    with pytest.raises(ChatError, match=r"example 'ex-short' lacks a position.*assistant_3"):
        encode_targets(loaded, [short], ["ex-short"], ["assistant_3"], None, "example")
    no_user_text = conversation("sys", "   ", "A RED APPLE.")
    with pytest.raises(ChatError, match=r"example 'ex-blank'.*user_end"):
        encode_targets(loaded, [no_user_text], ["ex-blank"], ["user_end"], None, "example")
    no_target = conversation("sys", "Name a red fruit.")
    with pytest.raises(ChatError, match=r"'ex-none': no assistant target"):
        encode_targets(loaded, [no_target], ["ex-none"], ["pre_assistant"], None, "example")


def test_target_truncation_keeps_positions(tiny_models) -> None:
    loaded = tiny_models["qwen2"]
    long = conversation("sys", "Name a red fruit.", "A RED APPLE " * 20)
    (enc,) = encode_targets(loaded, [long], ["x"], ["assistant_3"], 5, "example")
    assert enc.assistant_len == 5
    assert enc.position("pre_assistant") == enc.prompt_len - 1
