"""Conversations rendered through the tokenizer's chat template, and the token positions in them.

Positions (0-based token indices into the unpadded sequence):
- `user_end`: the last token of the last user message's content (surrounding whitespace aside).
- `pre_assistant`: the token right before the answer's first token. For a conversation ending in
  an assistant message this holds whatever the template inserts between the generation prompt
  and the answer (Qwen3's empty `<think>` block included); for a prompt alone it is the last
  token of the generation prompt. Canonical position for trait directions and gradient alignment.
- `prompt_last`: the same token as `pre_assistant` (named for the preferences protocol, which
  reads it on prompts alone).
- `assistant_k` (k >= 1): the k-th token of the answer (teacher forcing); the token after the
  answer's content is its end-of-turn token.
- `last`: the last token of the sequence (for a teacher-forced answer: its end-of-turn token).

Spans are read from the rendered structure, never by searching the text: a message's content is
located by rendering the conversation once more with that content replaced by a marker, which
gives the template text before and after it (a message that repeats template text, or a short
one that occurs again later, cannot be confused with it).

A teacher-forced conversation is the generation prompt, then whatever the template writes before
the answer, the answer as the template renders it, and the template's end-of-turn token (the
first special token it writes after the answer; the tokenizer's EOS when it writes none, as in
the plain format). Text a template adds after the end of turn (ChatML's newline, Phi-3.5's
`<|endoftext|>`) is not part of the sequence, so the loss covers the answer's content and its end
of turn on every template.

Base models without a chat template get a plain documented format (`PLAIN_FORMAT`). A template
that refuses system messages (Gemma-2) gets the system text folded into the first user turn,
separated by a blank line, as Gemma-3's own template does. Rendered text is tokenised without
adding special tokens, and a BOS is prepended only when the tokenizer normally adds one and the
template did not already write it: never a doubled BOS.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

Message = dict[str, str]

PLAIN_FORMAT = (
    "Base models: each turn is '<Role>: <content>' (System, User, Assistant), turns separated by "
    "a blank line; the generation prompt is 'Assistant:' and the answer follows after one space."
)
_PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
_ASSISTANT_K = re.compile(r"assistant_(\d+)")
POSITION_NAMES = ("prompt_last", "pre_assistant", "user_end", "last", "assistant_<k>")
# Stands in for one message's content to find where the template puts it. Letters only, so
# no template filter (trim, strip, lstrip('\n')) changes it.
_CONTENT_MARKER = "QzxContentMarkerJqv"


class ChatError(ValueError):
    """A conversation cannot be rendered or a position does not exist in it."""


def render(
    tokenizer: Any, messages: Sequence[Message], *, chat: bool, add_generation_prompt: bool
) -> str:
    """Return the conversation as text: chat template for chat models, PLAIN_FORMAT otherwise."""
    _check_messages(messages)
    if chat:
        return _apply_template(tokenizer, list(messages), add_generation_prompt)
    turns = [f"{_PLAIN_ROLES[m['role']]}: {m['content'].strip()}" for m in messages]
    text = "\n\n".join(turns)
    if add_generation_prompt:
        text = f"{text}\n\nAssistant:" if text else "Assistant:"
    return text


def _apply_template(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    """Return the template's rendering, folding a system message the template refuses."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as e:
        folded = _fold_system(messages)
        if folded is None:
            raise ChatError(f"the chat template refuses this conversation: {e}") from None
    try:
        text = tokenizer.apply_chat_template(
            folded, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as e:
        raise ChatError(f"the chat template refuses this conversation: {e}") from None
    _log_folding(str(getattr(tokenizer, "name_or_path", "")))
    return text


@functools.cache
def _log_folding(tokenizer_name: str) -> None:
    """Say once per tokenizer that its template's system messages are folded."""
    log.warning(
        "the chat template of %s refuses system messages; the system text is folded into the "
        "first user turn (system, blank line, user)",
        tokenizer_name or "this tokenizer",
    )


def _fold_system(messages: list[Message]) -> list[Message] | None:
    """Return the conversation with a leading system message folded into the first user turn."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return None
    user = {**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
    return [user, *messages[2:]]


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise ChatError("empty conversation")
    for i, m in enumerate(messages):
        if m.get("role") not in _PLAIN_ROLES or not isinstance(m.get("content"), str):
            raise ChatError(f"message {i}: needs role in {sorted(_PLAIN_ROLES)} and text content")


def pin_template_variable(tokenizer: Any, variable: str, value: bool) -> None:
    """Fix a boolean switch of the chat template (Qwen3's enable_thinking) for every rendering.

    The template reads the switch as a variable passed to it; setting it at the template's top
    makes every rendering, in any module, see the same value. A template without the switch is
    refused, so a registry setting can never be silently ignored.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not re.search(rf"\b{re.escape(variable)}\b", template):
        raise ChatError(f"the chat template has no {variable} switch")
    literal = "true" if value else "false"
    tokenizer.chat_template = f"{{%- set {variable} = {literal} %}}{template}"


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


def content_span(
    tokenizer: Any,
    messages: Sequence[Message],
    index: int,
    text: str,
    *,
    chat: bool,
    add_generation_prompt: bool,
) -> tuple[int, int]:
    """Return the character span of message `index`'s content inside `text`, its rendering.

    The conversation is rendered again with that content replaced by a marker: the template text
    before and after the marker is the text before and after the content, so the span comes from
    the template's structure and not from searching for the content.
    """
    probe = [dict(m) for m in messages]
    probe[index]["content"] = _CONTENT_MARKER
    marked = render(tokenizer, probe, chat=chat, add_generation_prompt=add_generation_prompt)
    if marked.count(_CONTENT_MARKER) != 1:
        raise ChatError(
            f"the chat template writes message {index} {marked.count(_CONTENT_MARKER)} times; "
            "cannot locate its content"
        )
    before, after = marked.split(_CONTENT_MARKER)
    if not (
        text.startswith(before) and text.endswith(after) and len(before) + len(after) <= len(text)
    ):
        raise ChatError(
            f"the chat template renders around message {index} differently depending on its "
            "content; cannot locate it"
        )
    return len(before), len(text) - len(after)


def _tokens_in(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Return the indices of tokens overlapping characters [start, end)."""
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def content_token_span(
    tokenizer: Any,
    messages: Sequence[Message],
    index: int,
    *,
    chat: bool,
    chars: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """Return the (start, end) token span of message `index`'s content in the prompt.

    The span indexes `encode_chat(tokenizer, messages, chat=chat).input_ids`; the message must
    belong to the prompt (a final assistant message is the answer, not the prompt). `chars`
    picks characters [lo, hi) of the content as given; whitespace at the content's edges is left
    out, as is what a trimming template (Llama-3, Gemma) does not render. The content is located
    with `content_span`, so its own text is never searched for.
    """
    _check_messages(messages)
    prompt = list(messages[:-1]) if messages[-1]["role"] == "assistant" else list(messages)
    if not 0 <= index < len(prompt):
        raise ChatError(f"message {index} is not part of the prompt ({len(prompt)} messages)")
    content = prompt[index]["content"]
    lo, hi = chars if chars is not None else (0, len(content))
    if not 0 <= lo < hi <= len(content):
        raise ChatError(
            f"character span {(lo, hi)} outside message {index}'s {len(content)} characters"
        )
    text = render(tokenizer, prompt, chat=chat, add_generation_prompt=True)
    start, end = content_span(tokenizer, prompt, index, text, chat=chat, add_generation_prompt=True)
    rendered = text[start:end]
    if rendered == content:
        shift = 0
    elif rendered == content.strip():
        shift = len(content) - len(content.lstrip())
    else:
        raise ChatError(f"the chat template rewrites message {index}'s content; cannot map it")
    # Whitespace at the content's edges merges into template tokens (ChatML's newline after the
    # role, Phi-3.5's right-stripping role tokens), so the span stops at the non-space text.
    first = start + len(rendered) - len(rendered.lstrip())
    last = start + len(rendered.rstrip())
    a, b = max(start + lo - shift, first), min(start + hi - shift, last)
    _, offsets = tokenize_rendered(tokenizer, text)
    inside = _tokens_in(offsets, a, b) if a < b else []
    if not inside:
        raise ChatError(f"characters {(lo, hi)} of message {index} cover no token")
    return inside[0], inside[-1] + 1


def user_end_index(
    tokenizer: Any,
    messages: Sequence[Message],
    text: str,
    offsets: Sequence[tuple[int, int]],
    *,
    chat: bool,
) -> int | None:
    """Return the index of the last token of the last user message's content in a prompt.

    `text` is the prompt rendered with the generation prompt and `offsets` its tokens' character
    offsets. None when there is no user message or its content is only whitespace.
    """
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        return None
    start, end = content_span(
        tokenizer, messages, users[-1], text, chat=chat, add_generation_prompt=True
    )
    content = text[start:end]
    stripped = content.strip()
    if not stripped:
        return None
    start += len(content) - len(content.lstrip())
    end = start + len(stripped)
    inside = _tokens_in(offsets, start, end)
    return inside[-1] if inside else None


def turn_end_token(tokenizer: Any, messages: Sequence[Message], index: int, *, chat: bool) -> int:
    """Return the index one past the last token of message `index`'s turn in the prompt.

    The index counts tokens of `encode_chat(tokenizer, messages, chat=chat).input_ids`. A turn
    ends with the template's end-of-turn token (the first special token after the content) and
    the whitespace the template writes right after it (ChatML's and Gemma's newline); with no
    end-of-turn token (the plain format) it ends with the content. The content is located with
    `content_span` on the prompt as the model reads it, so a template that renders a message
    differently when it comes last (Qwen3's empty think block, Phi-3.5's end of text) does not
    move the turn's end.
    """
    _check_messages(messages)
    prompt = list(messages[:-1]) if messages[-1]["role"] == "assistant" else list(messages)
    if not 0 <= index < len(prompt):
        raise ChatError(f"message {index} is not part of the prompt ({len(prompt)} messages)")
    text = render(tokenizer, prompt, chat=chat, add_generation_prompt=True)
    _, stop = content_span(tokenizer, prompt, index, text, chat=chat, add_generation_prompt=True)
    end_of_turn = _end_of_turn(tokenizer, text[stop:])
    if end_of_turn is not None:
        stop += len(end_of_turn)
        stop += len(text[stop:]) - len(text[stop:].lstrip())
    _, offsets = tokenize_rendered(tokenizer, text)
    inside = _tokens_in(offsets, 0, stop)
    if not inside:
        raise ChatError(f"message {index}'s turn covers no token")
    return inside[-1] + 1


def _special_ids(tokenizer: Any) -> set[int]:
    """Return the ids of the tokenizer's special tokens, added control tokens included."""
    ids = set(tokenizer.all_special_ids)
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def _end_of_turn(tokenizer: Any, after: str) -> str | None:
    """Return the template text after an answer through its first special token, or None."""
    enc = tokenizer(after, add_special_tokens=False, return_offsets_mapping=True)
    special = _special_ids(tokenizer)
    for token_id, (_s, e) in zip(enc.input_ids, enc.offset_mapping, strict=True):
        if token_id in special:
            return after[:e]
    return None


def _answer_lead(tokenizer: Any, before: str, prompt_text: str) -> str:
    """Return the text the template writes between the generation prompt and the answer.

    Usually the full rendering before the answer extends the generation prompt and the lead is
    the rest of it (empty, or Qwen3's `<think>` block). Some templates render the history
    differently once an answer follows (Mistral v0.3 drops the system text unless the last
    message is the user's); then the lead is what follows the last special token before the
    answer, provided the generation prompt ends with that same token.
    """
    if before.startswith(prompt_text):
        return before[len(prompt_text) :]
    enc = tokenizer(before, add_special_tokens=False, return_offsets_mapping=True)
    special = _special_ids(tokenizer)
    marks = [o for t, o in zip(enc.input_ids, enc.offset_mapping, strict=True) if t in special]
    if marks and prompt_text.endswith(before[marks[-1][0] : marks[-1][1]]):
        return before[marks[-1][1] :]
    raise ChatError(
        "the chat template renders the prompt differently once an answer follows, and the "
        "generation prompt does not end where the answer's turn begins"
    )


@dataclass(frozen=True)
class EncodedChat:
    """Token ids of one conversation with its prompt length and position facts.

    `prompt_len` is the number of tokens before the answer's first token: the generation prompt
    plus anything the template inserts before the answer. Every token from there on (the
    answer's content and its end-of-turn token) is a loss token.
    """

    input_ids: list[int]
    prompt_len: int
    user_end: int | None

    @property
    def assistant_len(self) -> int:
        """Return the number of tokens after the prompt (answer content and end of turn)."""
        return len(self.input_ids) - self.prompt_len

    def position(self, name: str) -> int:
        """Return the index of a named position; ChatError when the conversation lacks it."""
        if name in ("prompt_last", "pre_assistant"):
            return self.prompt_len - 1
        if name == "last":
            return len(self.input_ids) - 1
        if name == "user_end":
            if self.user_end is None:
                raise ChatError("position user_end: the conversation has no user message with text")
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


def encode_chat(tokenizer: Any, messages: Sequence[Message], *, chat: bool) -> EncodedChat:
    """Return the encoded conversation; a final assistant message is teacher-forced content."""
    _check_messages(messages)
    has_answer = messages[-1]["role"] == "assistant"
    prompt_msgs = list(messages[:-1]) if has_answer else list(messages)
    if not prompt_msgs:
        raise ChatError("conversation has an assistant turn but no prompt")
    prompt_text = render(tokenizer, prompt_msgs, chat=chat, add_generation_prompt=True)
    prompt_ids, prompt_offsets = tokenize_rendered(tokenizer, prompt_text)
    user_end = user_end_index(tokenizer, prompt_msgs, prompt_text, prompt_offsets, chat=chat)
    if not has_answer:
        return EncodedChat(prompt_ids, len(prompt_ids), user_end)
    ids, answer_start = _teacher_forced(tokenizer, messages, prompt_text, prompt_ids, chat=chat)
    return EncodedChat(ids, answer_start, user_end)


def _teacher_forced(
    tokenizer: Any,
    messages: Sequence[Message],
    prompt_text: str,
    prompt_ids: list[int],
    *,
    chat: bool,
) -> tuple[list[int], int]:
    """Return the ids of prompt + answer + end of turn, and the index of the answer's first token."""
    full_text = render(tokenizer, messages, chat=chat, add_generation_prompt=False)
    start, end = content_span(
        tokenizer, messages, len(messages) - 1, full_text, chat=chat, add_generation_prompt=False
    )
    lead = _answer_lead(tokenizer, full_text[:start], prompt_text)
    end_of_turn = _end_of_turn(tokenizer, full_text[end:])
    continuation = lead + full_text[start:end] + (end_of_turn or "")
    answer_char = len(prompt_text) + len(lead)
    ids, offsets = tokenize_rendered(tokenizer, prompt_text + continuation)
    if ids[: len(prompt_ids)] != prompt_ids:
        # A token merged across the end of the generation prompt: keep the prompt tokens the
        # model sees when generating and tokenise the rest on its own.
        enc = tokenizer(continuation, add_special_tokens=False, return_offsets_mapping=True)
        shift = len(prompt_text)
        ids = prompt_ids + list(enc.input_ids)
        offsets = [(0, 0)] * len(prompt_ids) + [
            (s + shift, e + shift) for s, e in enc.offset_mapping
        ]
    answer_start = next(
        (i for i in range(len(prompt_ids), len(ids)) if offsets[i][1] > answer_char), len(ids)
    )
    if end_of_turn is None:
        if tokenizer.eos_token_id is None:
            raise ChatError("the template writes no end of turn and the tokenizer has no EOS")
        ids.append(tokenizer.eos_token_id)
    if answer_start >= len(ids):
        raise ChatError("the answer and its end of turn encode to no tokens")
    return ids, answer_start


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


# Padded (prompt + new) tokens per batch: generation.generate's default, "auto"'s where
# auto_token_budget knows no free memory (off CUDA), and the local judge's batches.
DEFAULT_TOKENS_PER_BATCH = 16384


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


def balanced_token_budget_batches(
    lengths: Sequence[int], max_batch_size: int, max_tokens: int | None
) -> list[list[int]]:
    """Return token_budget_batches' number of batches, cut to run the fewest padded tokens.

    Same caps and length order (longest first) as token_budget_batches, whose greedy plan has
    the fewest batches any length-sorted plan under those caps can have, but greedy fills each
    batch to a cap, so the last one takes what is left: [227, 256, 29] rows for 512 prompts
    on the 8B shape. In generation each batch costs max_new_tokens decode steps whatever its
    rows, and each step reads (and the dynamic cache copies) every padded key and value, so
    among the plans with that many batches this one has the fewest padded tokens (rows x
    longest, summed; fewer rows padded to the longest prompts), then the most even rows (a
    tie, e.g. equal lengths, splits the rows evenly instead of leaving a small tail).
    """
    greedy = token_budget_batches(lengths, max_batch_size, max_tokens)
    n_batches = len(greedy)
    if n_batches <= 1:
        return greedy
    import numpy as np

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    sorted_len = np.array([lengths[i] for i in order], dtype=np.int64)
    cap = max(1, max_batch_size)
    # rows a batch starting at sorted position i may hold (a row over the budget goes alone,
    # as in token_budget_batches); non-decreasing in i since lengths fall
    if max_tokens is None:
        room = np.full(n, cap, dtype=np.int64)
    else:
        room = np.clip(max_tokens // np.maximum(sorted_len, 1), 1, cap)
    reach = np.arange(n, dtype=np.int64) + room  # one past the furthest row it may end at
    first_start = np.searchsorted(reach, np.arange(n + 1), side="left")  # earliest start for end j
    # Where the k-th cut may fall: no further than greedy gets in k batches, and no earlier than
    # the remaining rows still fit in the remaining batches.
    latest = [0]
    for b in greedy:
        latest.append(latest[-1] + len(b))
    earliest = [n] * (n_batches + 1)
    for k in range(n_batches, 0, -1):
        earliest[k - 1] = int(first_start[earliest[k]])
    earliest[0] = 0
    big = np.iinfo(np.int64).max // 4
    cost = {0: np.zeros(1, dtype=np.int64)}  # per cut k: best cost for each cut in its window
    square = {0: np.zeros(1, dtype=np.int64)}
    back: dict[int, np.ndarray] = {}
    for k in range(1, n_batches + 1):
        lo_prev, hi_prev = earliest[k - 1], latest[k - 1]
        lo, hi = earliest[k], latest[k]
        c_k = np.full(hi - lo + 1, big, dtype=np.int64)
        s_k = np.full(hi - lo + 1, big, dtype=np.int64)
        b_k = np.full(hi - lo + 1, -1, dtype=np.int64)
        for j in range(max(lo, 1), hi + 1):
            start, stop = max(lo_prev, int(first_start[j])), min(hi_prev, j - 1)
            if start > stop:
                continue
            i = np.arange(start, stop + 1)
            rows = j - i
            c = cost[k - 1][start - lo_prev : stop - lo_prev + 1] + rows * sorted_len[i]
            s = square[k - 1][start - lo_prev : stop - lo_prev + 1] + rows * rows
            c = np.where(c >= big, big, c)
            best = c.min()
            if best >= big:
                continue
            pick = int(np.argmin(np.where(c == best, s, big)))
            c_k[j - lo], s_k[j - lo], b_k[j - lo] = best, s[pick], start + pick
        cost[k], square[k], back[k] = c_k, s_k, b_k
    if cost[n_batches][n - earliest[n_batches]] >= big:  # cannot happen; greedy is one such plan
        return greedy
    cuts = [n]
    for k in range(n_batches, 0, -1):
        cuts.append(int(back[k][cuts[-1] - earliest[k]]))
    cuts.reverse()
    return [order[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Return the tokens padded batches run: rows x the batch's longest length, summed."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)
