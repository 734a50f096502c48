"""Conversations rendered through the tokenizer's chat template, and the token positions in them.

Positions (0-based token indices into the unpadded sequence):
- `user_end`: the last token of the last user message's content.
- `pre_assistant`: the token right before the assistant content begins, i.e. the last token of
  the prompt rendered with the generation prompt (for chat templates, the end of the assistant
  role marker). Canonical position for trait directions and gradient alignment.
- `prompt_last`: the last token of the prompt given to the model; the same token as
  `pre_assistant` (named for the preferences protocol, which reads it on prompts alone).
- `assistant_k` (k >= 1): the k-th token of the assistant content (teacher forcing).
- `last`: the last token of the sequence.

Base models without a chat template get a plain documented format (`PLAIN_FORMAT`).
Rendered text is tokenised without adding special tokens, and a BOS is prepended only when the
tokenizer normally adds one and the template did not already write it: never a doubled BOS.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

Message = dict[str, str]

PLAIN_FORMAT = (
    "Base models: each turn is '<Role>: <content>' (System, User, Assistant), turns separated by "
    "a blank line; the generation prompt is 'Assistant:' and the answer follows after one space."
)
_PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
_ASSISTANT_K = re.compile(r"assistant_(\d+)")
POSITION_NAMES = ("prompt_last", "pre_assistant", "user_end", "last", "assistant_<k>")


class ChatError(ValueError):
    """A conversation cannot be rendered or a position does not exist in it."""


def render(
    tokenizer: Any, messages: Sequence[Message], *, chat: bool, add_generation_prompt: bool
) -> str:
    """Return the conversation as text: chat template for chat models, PLAIN_FORMAT otherwise."""
    _check_messages(messages)
    if chat:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    turns = [f"{_PLAIN_ROLES[m['role']]}: {m['content'].strip()}" for m in messages]
    text = "\n\n".join(turns)
    if add_generation_prompt:
        text = f"{text}\n\nAssistant:" if text else "Assistant:"
    return text


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise ChatError("empty conversation")
    for i, m in enumerate(messages):
        if m.get("role") not in _PLAIN_ROLES or not isinstance(m.get("content"), str):
            raise ChatError(f"message {i}: needs role in {sorted(_PLAIN_ROLES)} and text content")


def adds_bos(tokenizer: Any) -> bool:
    """Return whether the tokenizer prepends BOS when asked to add special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("x", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == bos


def tokenize_rendered(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Return token ids and character offsets of rendered text, with exactly one BOS if needed."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]
    if adds_bos(tokenizer) and not text.startswith(tokenizer.bos_token):
        ids = [tokenizer.bos_token_id, *ids]
        offsets = [(0, 0), *offsets]
    return ids, offsets


@dataclass(frozen=True)
class EncodedChat:
    """Token ids of one conversation with its prompt length and position facts."""

    input_ids: list[int]
    prompt_len: int
    user_end: int | None

    @property
    def assistant_len(self) -> int:
        """Return the number of tokens after the prompt (assistant content and end of turn)."""
        return len(self.input_ids) - self.prompt_len

    def position(self, name: str) -> int:
        """Return the index of a named position; ChatError when the conversation lacks it."""
        if name in ("prompt_last", "pre_assistant"):
            return self.prompt_len - 1
        if name == "last":
            return len(self.input_ids) - 1
        if name == "user_end":
            if self.user_end is None:
                raise ChatError("position user_end: the conversation has no user message")
            return self.user_end
        m = _ASSISTANT_K.fullmatch(name)
        if m:
            k = int(m.group(1))
            if k < 1 or k > self.assistant_len:
                raise ChatError(
                    f"position {name}: the assistant turn has {self.assistant_len} tokens"
                )
            return self.prompt_len + k - 1
        raise ChatError(f"unknown position {name!r} (known: {', '.join(POSITION_NAMES)})")

    def loss_mask(self) -> list[int]:
        """Return 1 on assistant tokens (content and end of turn), 0 on the prompt."""
        return [0] * self.prompt_len + [1] * self.assistant_len


def _user_end(messages: Sequence[Message], text: str, offsets: list[tuple[int, int]]) -> int | None:
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        return None
    content = users[-1]["content"].strip()
    if not content:
        return None
    start = text.rfind(content)
    if start < 0:
        raise ChatError("the chat template altered the user content; cannot locate user_end")
    end = start + len(content)
    last = None
    for i, (s, e) in enumerate(offsets):
        if e > s and s < end:
            last = i
    return last


def encode_chat(tokenizer: Any, messages: Sequence[Message], *, chat: bool) -> EncodedChat:
    """Return the encoded conversation; a final assistant message is teacher-forced content."""
    _check_messages(messages)
    has_answer = messages[-1]["role"] == "assistant"
    prompt_msgs = list(messages[:-1]) if has_answer else list(messages)
    if not prompt_msgs:
        raise ChatError("conversation has an assistant turn but no prompt")
    prompt_text = render(tokenizer, prompt_msgs, chat=chat, add_generation_prompt=True)
    prompt_ids, offsets = tokenize_rendered(tokenizer, prompt_text)
    user_end = _user_end(prompt_msgs, prompt_text, offsets)
    if not has_answer:
        return EncodedChat(prompt_ids, len(prompt_ids), user_end)
    answer = messages[-1]["content"]
    if chat:
        full_text = render(tokenizer, messages, chat=True, add_generation_prompt=False)
        full_ids, _ = tokenize_rendered(tokenizer, full_text)
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            return EncodedChat(full_ids, len(prompt_ids), user_end)
    # Templates whose full rendering does not extend the prompt rendering (and the plain
    # format) get the answer appended to the prompt tokens exactly as generation would see it.
    text = answer if chat else " " + answer.strip()
    answer_ids = tokenizer(text, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    tail = [eos] if eos is not None else []
    return EncodedChat(prompt_ids + list(answer_ids) + tail, len(prompt_ids), user_end)


@dataclass
class ChatBatch:
    """Padded tensors for a batch of encoded conversations."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    encoded: list[EncodedChat]

    def positions(self, name: str) -> torch.Tensor:
        """Return the absolute index of a named position in each padded row."""
        rel = torch.tensor([e.position(name) for e in self.encoded], dtype=torch.long)
        return absolute_positions(self.attention_mask, rel)

    def to(self, device: torch.device | str) -> ChatBatch:
        """Return the batch on a device."""
        return ChatBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.encoded,
        )


def absolute_positions(attention_mask: torch.Tensor, relative: torch.Tensor) -> torch.Tensor:
    """Return padded-row indices of unpadded positions, read per row from the attention mask.

    The first real token of a row is where its mask first equals 1, so the same relative
    position maps correctly under left and right padding.
    """
    first = attention_mask.long().argmax(dim=1)
    return first.cpu() + relative.cpu()


def collate(
    encoded: Sequence[EncodedChat], pad_token_id: int, padding_side: str = "left"
) -> ChatBatch:
    """Return a padded batch; labels are -100 outside the assistant tokens."""
    if not encoded:
        raise ChatError("empty batch")
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[row, sl] = torch.tensor(e.input_ids)
        mask[row, sl] = 1
        lab = torch.tensor(e.input_ids)
        lab[: e.prompt_len] = -100
        labels[row, sl] = lab
    return ChatBatch(ids, mask, labels, list(encoded))


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Return index batches grouped by length (longest first) so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def token_budget_batches(
    lengths: Sequence[int], max_batch_size: int, max_tokens: int | None
) -> list[list[int]]:
    """Return length-sorted batches capped by rows and by padded tokens (rows x longest)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        too_many = max_tokens is not None and current and longest * (len(current) + 1) > max_tokens
        if current and (len(current) >= max_batch_size or too_many):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
