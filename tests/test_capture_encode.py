"""Batched prompt encoding for capture gives exactly what encode_chat gives, item by item."""

from __future__ import annotations

import dataclasses

import pytest

from llmlab.activations import CaptureItem, encode_items
from llmlab.chat import ChatError, encode_chat

CONVS = [
    [{"role": "user", "content": "Hi."}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Tell me about the sea and its tides."},
    ],
    [
        {"role": "user", "content": "What is 17 times 3?"},
        {"role": "assistant", "content": "It is 51."},
    ],
    [
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "  Second, with spaces and ünïcödé — ok?  "},
    ],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "word " * 300}],
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("chat", [True, False])
def test_encode_items_equals_encode_chat(tiny_models, arch, chat):
    loaded = dataclasses.replace(tiny_models[arch], chat=chat)
    items = [CaptureItem(f"i{k}", c) for k, c in enumerate(CONVS * 3)]
    want = [encode_chat(loaded.tokenizer, it.messages, chat=chat) for it in items]
    assert encode_items(loaded, items) == want


def test_encode_items_raises_the_first_bad_item(tiny_models):
    loaded = tiny_models["llama"]
    items = [CaptureItem("ok", CONVS[0]), CaptureItem("bad", [{"role": "robot", "content": "x"}])]
    with pytest.raises(ChatError, match="message 0"):
        encode_items(loaded, items)
