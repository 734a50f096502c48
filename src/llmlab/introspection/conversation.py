"""Detection conversations, the token span of their context turn, and per-row steering.

A detection conversation is: user context turn, a fixed assistant reply, the user's question,
and (for training) the answer: the answer prefix ("The answer is", the anchor's read-out) and
then the one-token label, which is scored yes against no. Steering covers the tokens of the context turn's
content only (or one sentence of it); the question and the answer are computed without
steering and see it only through the keys and values of the steered positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmlab.chat import (
    ChatError,
    EncodedChat,
    Message,
    content_token_span,
    encode_chat,
    turn_end_token,
)
from llmlab.models import LoadedModel
from llmlab.steering import steer

LABELS = ("yes", "no")


def detection_messages(
    context: str, reply: str, question: str, answer: str | None = None
) -> list[Message]:
    """Return the conversation: context turn, fixed reply, question (and answer if given)."""
    msgs: list[Message] = [
        {"role": "user", "content": context},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": question},
    ]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def answer_text(prefix: str, label: str) -> str:
    """Return the assistant's answer: the label after the answer prefix (bare when it is "")."""
    return f"{prefix} {label}" if prefix else label


def prefixed_prompt(loaded: LoadedModel, prompt: Sequence[Message], prefix: str) -> EncodedChat:
    """Return the prompt encoded up to the label: the assistant turn opened with the prefix.

    With an empty prefix this is the prompt with its generation prompt, so the next token is
    the answer's first token. Otherwise the conversation is encoded with the answer
    `<prefix> yes` and cut before the label's token; ChatError when the prefix does not end on
    a token boundary there (the label would not be one next token).
    """
    if not prefix:
        return encode_chat(loaded.tokenizer, prompt, chat=loaded.chat)
    full = [*prompt, {"role": "assistant", "content": answer_text(prefix, LABELS[0])}]
    enc = encode_chat(loaded.tokenizer, full, chat=loaded.chat)
    toks = answer_tokens(loaded, full)
    if loaded.tokenizer.decode(toks[:-1]).strip() != prefix.strip():
        raise ChatError(
            f"answer prefix {prefix!r} is not followed by a one-token {LABELS[0]!r} for "
            f"{loaded.name}"
        )
    return EncodedChat(enc.input_ids[: enc.prompt_len + len(toks) - 1], enc.prompt_len, None)


def label_choice_ids(
    loaded: LoadedModel, prompt: Sequence[Message], prefix: str
) -> tuple[int, ...]:
    """Return the token id of each label (yes, no) as it follows the answer prefix."""
    ids = []
    for label in LABELS:
        msgs = [*prompt, {"role": "assistant", "content": answer_text(prefix, label)}]
        toks = answer_tokens(loaded, msgs)
        head = loaded.tokenizer.decode(toks[:-1]).strip()
        if head != prefix.strip() or loaded.tokenizer.decode(toks[-1:]).strip() != label:
            raise ChatError(
                f"label {label!r} after prefix {prefix!r} is not one token for {loaded.name}"
            )
        ids.append(toks[-1])
    return tuple(ids)


def turn_token_span(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    chat: bool,
    turn: int = 0,
    chars: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """Return the (start, end) token span of message `turn`'s content (or of chars within it).

    The span indexes the conversation as `encode_chat` encodes it. It is read from the
    template's structure (`content_token_span`), so a context that repeats template text or
    text of another turn is still located at its own turn.
    """
    return content_token_span(tokenizer, messages, turn, chat=chat, chars=chars)


def single_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """Return the ids of the single-token spellings of words (bare, capitalised, spaced)."""
    ids: set[int] = set()
    for w in words:
        for form in {w, w.capitalize(), w.upper(), " " + w, " " + w.capitalize()}:
            toks = tokenizer(form, add_special_tokens=False).input_ids
            if len(toks) == 1:
                ids.add(int(toks[0]))
    return sorted(ids)


def answer_tokens(loaded: LoadedModel, messages: Sequence[Message]) -> list[int]:
    """Return the token ids of the final assistant message's content (no end-of-turn tokens)."""
    enc = encode_chat(loaded.tokenizer, messages, chat=loaded.chat)
    answer = messages[-1]["content"].strip()
    tail = enc.input_ids[enc.prompt_len :]
    for k in range(1, len(tail) + 1):
        if loaded.tokenizer.decode(tail[:k]).strip() == answer:
            return tail[:k]
    raise ChatError(f"answer {answer!r} cannot be found in its encoding for {loaded.name}")


def answer_token_id(loaded: LoadedModel, messages: Sequence[Message]) -> int:
    """Return the token id of a one-token answer; ChatError when the answer spans more tokens."""
    toks = answer_tokens(loaded, messages)
    if len(toks) != 1:
        raise ChatError(
            f"answer {messages[-1]['content']!r} is not one token for {loaded.name} "
            f"({len(toks)} tokens)"
        )
    return toks[0]


def reply_token_span(tokenizer: Any, messages: Sequence[Message], *, chat: bool) -> tuple[int, int]:
    """Return (0, end): every token up to and including the first assistant reply's turn.

    The anchor's steered portion: the context turn and the fixed reply (template tokens, the
    reply's end of turn and the whitespace after it included) fill the cache while steered; the
    question and the answer are read after it. The end is read from the template's structure
    (`turn_end_token`), so templates that render a reply differently when it comes last
    (Qwen3, Phi-3.5) give the same span as the others.
    """
    roles = [m["role"] for m in messages[:2]]
    if roles != ["user", "assistant"]:
        raise ChatError(f"the steered portion must be a user turn and a reply, got {roles}")
    return 0, turn_end_token(tokenizer, messages, 1, chat=chat)


@dataclass(frozen=True)
class RowSteer:
    """Steering of one row: unit vector, absolute magnitude, layers, token span (unpadded)."""

    vector: torch.Tensor
    magnitude: float
    layers: tuple[int, ...]
    span: tuple[int, int]


@contextlib.contextmanager
def steer_rows(
    loaded: LoadedModel,
    specs: Sequence[RowSteer | None],
    attention_mask: torch.Tensor,
) -> Iterator[None]:
    """Steer each row's span at its own layers during the pass over the padded batch.

    One steering context is opened per distinct layer set, with the magnitude zero on rows that
    belong to another set; spans are shifted by each row's padding (read from the mask).
    Later passes of other widths (decode steps) are left unsteered.
    """
    n, width = attention_mask.shape
    first = attention_mask.long().argmax(dim=1).cpu()
    by_layers: dict[tuple[int, ...], list[int]] = {}
    for row, spec in enumerate(specs):
        if spec is not None:
            by_layers.setdefault(spec.layers, []).append(row)
    with contextlib.ExitStack() as stack:
        for layers, rows in sorted(by_layers.items()):
            vectors = torch.zeros(n, loaded.hidden_size)
            scale = torch.zeros(n)
            mask = torch.zeros(n, width)
            for row in rows:
                spec = specs[row]
                assert spec is not None
                vectors[row] = spec.vector.float()
                scale[row] = spec.magnitude
                s, e = spec.span
                mask[row, int(first[row]) + s : int(first[row]) + e] = 1.0
            stack.enter_context(
                steer(loaded.layers, list(layers), vectors.to(loaded.device), scale, mask)
            )
        yield
