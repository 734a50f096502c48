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

from llmlab.chat import ChatError, EncodedChat, Message, encode_chat, render, tokenize_rendered
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

    The span indexes the conversation as `encode_chat` encodes it; ChatError when the template
    rewrites the content or the rendering of the prompt does not extend the turn's rendering.
    """
    has_answer = messages[-1]["role"] == "assistant"
    prompt_msgs = list(messages[:-1]) if has_answer else list(messages)
    if not 0 <= turn < len(prompt_msgs):
        raise ChatError(f"turn {turn} is not part of the prompt ({len(prompt_msgs)} messages)")
    content = prompt_msgs[turn]["content"]
    lo, hi = chars if chars is not None else (0, len(content))
    if not 0 <= lo < hi <= len(content):
        raise ChatError(f"character span {(lo, hi)} outside the turn's {len(content)} characters")
    prefix = render(tokenizer, prompt_msgs[: turn + 1], chat=chat, add_generation_prompt=False)
    start_char = prefix.rfind(content)
    if start_char < 0:
        raise ChatError("the chat template altered the context turn; cannot locate its tokens")
    text = render(tokenizer, prompt_msgs, chat=chat, add_generation_prompt=True)
    if not text.startswith(prefix[: start_char + len(content)]):
        raise ChatError("the prompt rendering does not start with the context turn's rendering")
    ids, offsets = tokenize_rendered(tokenizer, text)
    a, b = start_char + lo, start_char + hi
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
    if not inside:
        raise ChatError("the context span covers no token")
    enc = encode_chat(tokenizer, messages, chat=chat)
    if enc.input_ids[: inside[-1] + 1] != ids[: inside[-1] + 1]:
        raise ChatError("tokenisation of the prompt differs from the encoded conversation")
    return inside[0], inside[-1] + 1


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

    The anchor's steered portion: the conversation rendered through the context turn and the
    fixed reply (template tokens included) fills the cache while steered; the question and the
    answer are read after it. ChatError when that rendering is not a prefix of the encoding.
    """
    roles = [m["role"] for m in messages[:2]]
    if roles != ["user", "assistant"]:
        raise ChatError(f"the steered portion must be a user turn and a reply, got {roles}")
    text = render(tokenizer, list(messages[:2]), chat=chat, add_generation_prompt=False)
    ids, _ = tokenize_rendered(tokenizer, text)
    enc = encode_chat(tokenizer, messages, chat=chat)
    if enc.input_ids[: len(ids)] != ids:
        raise ChatError(
            "the context turn and reply do not tokenise as a prefix of the conversation"
        )
    return 0, len(ids)


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
