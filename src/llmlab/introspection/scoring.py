"""Forced-choice read-outs: log-probabilities of answer tokens at the first answer position."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmlab.chat import Message, collate, encode_chat, token_budget_batches
from llmlab.introspection.conversation import RowSteer, steer_rows
from llmlab.models import LoadedModel


@dataclass(frozen=True)
class ChoiceScores:
    """Per-row log-probabilities of each choice (logsumexp over its token spellings)."""

    logprobs: list[np.ndarray]  # row -> [n_choices] log P(choice) under the full softmax
    mass: np.ndarray  # row -> total probability on all choices' tokens

    def normalised(self, row: int) -> np.ndarray:
        """Return the choice probabilities of a row renormalised over the choices."""
        lp = self.logprobs[row]
        p = np.exp(lp - lp.max())
        return p / p.sum()

    def argmax(self) -> list[int]:
        """Return the most likely choice of every row."""
        return [int(np.argmax(lp)) for lp in self.logprobs]


@torch.no_grad()
def choice_scores(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[Message]],
    choices: Sequence[Sequence[Sequence[int]]],
    specs: Sequence[RowSteer | None] | None = None,
    batch_size: int = 16,
    max_tokens_per_batch: int | None = 8192,
) -> ChoiceScores:
    """Return the choice log-probabilities of the next token after each prompt.

    choices[i] lists, for row i, the token ids of each choice (several spellings per choice);
    specs[i] steers row i's span during the pass (None: unsteered).
    """
    if len(choices) != len(prompts) or (specs is not None and len(specs) != len(prompts)):
        raise ValueError("prompts, choices and specs must have the same length")
    encoded = [encode_chat(loaded.tokenizer, p, chat=loaded.chat) for p in prompts]
    lengths = [len(e.input_ids) for e in encoded]
    out_lp: list[np.ndarray] = [np.empty(0)] * len(prompts)
    mass = np.zeros(len(prompts))
    for rows in token_budget_batches(lengths, batch_size, max_tokens_per_batch):
        batch = collate([encoded[i] for i in rows], loaded.tokenizer.pad_token_id, "left")
        batch = batch.to(loaded.device)
        row_specs = [specs[i] for i in rows] if specs is not None else [None] * len(rows)
        with steer_rows(loaded, row_specs, batch.attention_mask):
            logits = loaded.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).logits[:, -1]
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for k, i in enumerate(rows):
            per_choice = []
            all_ids: set[int] = set()
            for ids in choices[i]:
                if not ids:
                    raise ValueError(f"row {i}: a choice has no token ids")
                per_choice.append(float(torch.logsumexp(logp[k, list(ids)], dim=0)))
                all_ids.update(ids)
            out_lp[i] = np.array(per_choice)
            mass[i] = float(logp[k, sorted(all_ids)].exp().sum())
    return ChoiceScores(out_lp, mass)
