"""Judge backend running a transformers causal LM in this process (greedy decoding)."""

from __future__ import annotations

import threading
from typing import Any

from .base import JudgeReply, Messages, merge_logprob


def render_plain(messages: Messages) -> str:
    """Return a "Role: text" transcript ending in "Assistant:" (tokenizers with no template)."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


class LocalBackend:
    """A loaded causal LM + tokenizer answering judge prompts; decoding is always greedy."""

    kind = "local"

    def __init__(self, model: Any, tokenizer: Any, model_name: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name or str(getattr(model.config, "name_or_path", "") or "")
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
        greedily so that its verdicts are reproducible.
        """
        import torch

        del temperature
        ids = self.encode(messages)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        with self._lock, torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                num_beams=1,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=pad_id,
            )
        new_ids = out.sequences[0, len(ids) :].tolist()
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in new_ids:
            new_ids = new_ids[: new_ids.index(eos) + 1]
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        top: dict[str, float] | None = None
        if top_logprobs and out.logits:
            # raw logits of the first step, before any logits processor touched them
            logp = torch.log_softmax(out.logits[0][0].float(), dim=-1)
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
