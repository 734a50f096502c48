"""Chat rendering and token positions, for every template the project can load offline."""

from __future__ import annotations

import pytest
import torch

from llmlab.chat import (
    ChatError,
    adds_bos,
    collate,
    encode_chat,
    render,
    tokenize_rendered,
)

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four, of course."},
]


def _tok(loaded):
    return loaded.tokenizer


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_positions_land_on_the_right_tokens(tiny_models, arch):
    tok = _tok(tiny_models[arch])
    enc = encode_chat(tok, CONV, chat=True)
    ids = enc.input_ids
    # user_end is the last token of the user content.
    assert tok.decode(ids[enc.position("user_end")]).strip().endswith("?")
    # The assistant content starts right after pre_assistant.
    tail = tok.decode(ids[enc.position("assistant_1") :])
    assert tail.startswith("Four")
    assert enc.position("pre_assistant") == enc.position("assistant_1") - 1
    assert enc.position("prompt_last") == enc.position("pre_assistant")
    # The prompt rendered with a generation prompt is a prefix of the full conversation.
    prompt_only = encode_chat(tok, CONV[:-1], chat=True)
    assert ids[: prompt_only.prompt_len] == prompt_only.input_ids
    assert prompt_only.position("pre_assistant") == enc.position("pre_assistant")


def test_hand_checked_indices_llama3(tiny_models):
    tok = _tok(tiny_models["llama"])
    enc = encode_chat(tok, CONV, chat=True)
    pieces = [tok.decode([i]) for i in enc.input_ids]
    # <|begin_of_text|> <|start_header_id|> system <|end_header_id|> \n\n Be brief . <|eot_id|> ...
    assert pieces[0] == "<|begin_of_text|>"
    assert pieces.count("<|begin_of_text|>") == 1
    u = enc.position("user_end")
    assert pieces[u] == "?" and pieces[u + 1] == "<|eot_id|>"
    pre = enc.position("pre_assistant")
    assert pieces[pre - 1] == "<|end_header_id|>" and pieces[pre].strip("\n") == ""
    assert "".join(pieces[: pre + 1]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_hand_checked_indices_gemma(tiny_models):
    tok = _tok(tiny_models["gemma3"])
    enc = encode_chat(tok, CONV, chat=True)
    pieces = [tok.decode([i]) for i in enc.input_ids]
    assert pieces[0] == "<bos>" and pieces.count("<bos>") == 1
    assert pieces[enc.position("user_end")] == "?"
    assert pieces[enc.position("user_end") + 1] == "<end_of_turn>"
    pre = enc.position("pre_assistant")
    turn = max(i for i in range(pre) if pieces[i] == "<start_of_turn>")
    assert "".join(pieces[turn + 1 : pre + 1]).strip() == "model"


def test_smollm2_template_and_no_double_bos(smol):
    tok = smol.tokenizer
    text = render(tok, CONV[:-1], chat=True, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids, _ = tokenize_rendered(tok, text)
    assert ids == tok(text, add_special_tokens=False).input_ids
    enc = encode_chat(tok, CONV, chat=True)
    assert tok.decode(enc.input_ids[enc.position("assistant_1")]).strip() == "Four"
    assert tok.decode(enc.input_ids[enc.position("user_end")]) == "?"


def test_base_model_plain_format_gets_exactly_one_bos(tiny_models):
    tok = _tok(tiny_models["gemma3"])
    assert adds_bos(tok)
    enc = encode_chat(tok, CONV, chat=False)
    assert enc.input_ids[0] == tok.bos_token_id
    assert enc.input_ids.count(tok.bos_token_id) == 1
    text = tok.decode(enc.input_ids[: enc.prompt_len], skip_special_tokens=True)
    assert text.endswith("Assistant:")
    assert tok.decode(enc.input_ids[enc.position("assistant_1")]).strip() == "Four"
    assert enc.input_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("side", ["left", "right"])
def test_positions_independent_of_padding_side(tiny_models, side):
    tok = _tok(tiny_models["qwen2"])
    short = encode_chat(tok, CONV, chat=True)
    long = encode_chat(
        tok,
        [{"role": "user", "content": "Tell me a much longer story about a dog."}, CONV[2]],
        chat=True,
    )
    batch = collate([short, long], tok.pad_token_id, padding_side=side)
    for name in ("user_end", "pre_assistant", "assistant_1", "last"):
        pos = batch.positions(name)
        for row, enc in enumerate([short, long]):
            assert batch.input_ids[row, pos[row]].item() == enc.input_ids[enc.position(name)]
    # Labels cover the assistant tokens only.
    for row, enc in enumerate([short, long]):
        lab = batch.labels[row][batch.attention_mask[row].bool()]
        assert torch.equal(lab != -100, torch.tensor(enc.loss_mask()).bool())


def test_missing_positions_and_bad_messages_are_clear(tiny_models):
    tok = _tok(tiny_models["llama"])
    prompt_only = encode_chat(tok, CONV[:-1], chat=True)
    with pytest.raises(ChatError, match="assistant_1"):
        prompt_only.position("assistant_1")
    with pytest.raises(ChatError, match="unknown position"):
        prompt_only.position("middle")
    no_user = encode_chat(tok, [{"role": "system", "content": "x"}], chat=True)
    with pytest.raises(ChatError, match="user_end"):
        no_user.position("user_end")
    with pytest.raises(ChatError, match="role"):
        encode_chat(tok, [{"role": "robot", "content": "hi"}], chat=True)
    with pytest.raises(ChatError, match="empty"):
        encode_chat(tok, [], chat=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_loss_ends_at_the_end_of_turn_and_short_user_text_is_found_in_its_turn(tiny_models, arch):
    tok = _tok(tiny_models[arch])
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "a b"}]
    enc = encode_chat(tok, conv, chat=True)
    pieces = [tok.decode([i]) for i in enc.input_ids]
    # "a" also occurs in the generation prompt ("assistant") and in the answer: user_end is
    # the user's own token, right before the template's end of the user turn.
    u = enc.position("user_end")
    assert pieces[u] == "a" and u < enc.position("pre_assistant")
    assert pieces[u + 1] == tok.eos_token  # each tiny template ends a turn with its EOS
    # The loss covers the answer and one end-of-turn token; the newline a template writes
    # after it is not part of the sequence.
    loss = [p for p, m in zip(pieces, enc.loss_mask(), strict=True) if m]
    assert "".join(loss).strip().startswith("a b")
    assert loss[-1] == tok.eos_token and enc.input_ids[-1] == tok.eos_token_id
