"""Judge backend running a transformers causal LM in this process (greedy decoding)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from .base import JudgeReply, Messages, merge_logprob


def render_plain(messages: Messages) -> str:
    """Return a "Role: text" transcript ending in "Assistant:" (tokenizers with no template)."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


class LocalBackend:
    """A loaded causal LM + tokenizer answering judge prompts; decoding is always greedy."""

    kind = "local"

    def __init__(
        self, model: Any, tokenizer: Any, model_name: str = "", batch_size: int = 16
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name or str(getattr(model.config, "name_or_path", "") or "")
        # rows per padded batch of complete_many (judge.local_batch_size)
        self.batch_size = batch_size
        # one forward pass at a time: torch already spreads a pass over the cores, and
        # concurrent generate() calls on one module would only contend
        self._lock = threading.Lock()

    @property
    def retries(self) -> int:
        """Return 0: a local model has nothing to retry."""
        return 0

    def encode(self, messages: Messages) -> list[int]:
        """Return the prompt token ids, via the chat template when the tokenizer has one."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # the template already writes any BOS token it wants
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(render_plain(messages), add_special_tokens=True)["input_ids"])

    def complete(
        self, messages: Messages, *, max_tokens: int, temperature: float, top_logprobs: int | None
    ) -> JudgeReply:
        """Return the greedy reply and the first generated position's top-k token logprobs.

        `temperature` is accepted for interface parity but ignored: a local judge decodes
        greedily so that its verdicts are reproducible. One request is a batch of one row
        (no padding) of complete_many.
        """
        return self.complete_many(
            [messages], max_tokens=max_tokens, temperature=temperature, top_logprobs=top_logprobs
        )[0]

    def _reply(
        self,
        ids: list[int],
        new_ids: list[int],
        logits: Any,
        row: int,
        top_logprobs: int | None,
    ) -> JudgeReply:
        """Return the reply of one row: its new tokens up to and including the first EOS, and
        the top-k logprobs of its first step's raw logits (before any logits processor)."""
        import torch

        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in new_ids:
            new_ids = new_ids[: new_ids.index(eos) + 1]
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        top: dict[str, float] | None = None
        if top_logprobs and logits:
            logp = torch.log_softmax(logits[0][row].float(), dim=-1)
            k = min(int(top_logprobs), logp.shape[-1])
            values, indices = torch.topk(logp, k)
            top = {}
            for lp, tid in zip(values.tolist(), indices.tolist(), strict=True):
                merge_logprob(top, self.tokenizer.decode([tid]).strip(), float(lp))
        return JudgeReply(
            text=text,
            top_logprobs=top,
            input_tokens=len(ids),
            output_tokens=len(new_ids),
        )

    def complete_many(
        self,
        requests: Sequence[Messages],
        *,
        max_tokens: int,
        temperature: float,
        top_logprobs: int | None,
    ) -> list[JudgeReply]:
        """Return the greedy replies to many requests, in order, from left-padded batches.

        Batches are length-sorted and capped by `batch_size` rows and by the library's default
        (prompt + new) token budget, as `llmlab.generation.generate` forms its batches. One
        forward for many rows is what makes a local judge fast on a GPU, and on a CPU it saves
        each short request's fixed per-forward cost. A row's reply equals its single-request
        reply up to float rounding (padding changes the reduction shapes, not the maths).
        """
        import torch

        from llmlab.chat import (
            DEFAULT_TOKENS_PER_BATCH,
            EncodedChat,
            collate,
            token_budget_batches,
        )

        del temperature  # greedy, as complete()
        encoded = [self.encode(m) for m in requests]
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        replies: list[JudgeReply | None] = [None] * len(encoded)
        lengths = [len(ids) + max_tokens for ids in encoded]
        for batch in token_budget_batches(lengths, self.batch_size, DEFAULT_TOKENS_PER_BATCH):
            # whole prompts, no answer yet: prompt_len is the row's length
            padded = collate(
                [EncodedChat(encoded[i], len(encoded[i]), None) for i in batch], pad_id
            )
            width = padded.input_ids.shape[1]
            with self._lock, torch.no_grad():
                out = self.model.generate(
                    input_ids=padded.input_ids.to(device),
                    attention_mask=padded.attention_mask.to(device),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    num_beams=1,
                    output_logits=True,
                    return_dict_in_generate=True,
                    pad_token_id=pad_id,
                )
            for row, i in enumerate(batch):
                new_ids = out.sequences[row, width:].tolist()
                replies[i] = self._reply(encoded[i], new_ids, out.logits, row, top_logprobs)
        return [r for r in replies if r is not None]
