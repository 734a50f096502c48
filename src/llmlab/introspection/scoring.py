"""Forced-choice read-outs: log-probabilities of answers right after the prompt.

`choice_scores` reads one position (the first answer token) and suits one-token answers;
`continuation_scores` teacher-forces each whole option and sums its token log-probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmlab.chat import (
    ChatError,
    EncodedChat,
    Message,
    collate,
    encode_chat,
    token_budget_batches,
)
from llmlab.introspection.conversation import (
    RowSteer,
    answer_tokens,
    prefixed_prompt,
    single_token_ids,
    steer_rows,
)
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
    prefix: str = "",
) -> ChoiceScores:
    """Return the choice log-probabilities of the next token after each prompt.

    choices[i] lists, for row i, the token ids of each choice (several spellings per choice);
    specs[i] steers row i's span during the pass (None: unsteered). prefix opens the
    assistant's answer before the read-out (e.g. "The answer is"); "" reads the answer's first
    token.
    """
    if len(choices) != len(prompts) or (specs is not None and len(specs) != len(prompts)):
        raise ValueError("prompts, choices and specs must have the same length")
    encoded = [prefixed_prompt(loaded, p, prefix) for p in prompts]
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


def yes_no_choices(loaded: LoadedModel) -> list[list[int]]:
    """Return [yes spellings, no spellings] as single-token ids of the model's tokenizer."""
    yes = single_token_ids(loaded.tokenizer, ["yes"])
    no = single_token_ids(loaded.tokenizer, ["no"])
    if not yes or not no:
        raise ChatError(f"{loaded.name}: 'yes'/'no' have no single-token spelling")
    return [yes, no]


def option_choices(loaded: LoadedModel, options: Sequence[str]) -> list[list[int]]:
    """Return per option the first-token ids of its spellings; ChatError when options collide."""
    out: list[list[int]] = []
    for opt in options:
        ids = set()
        for form in {opt, opt.capitalize(), " " + opt, " " + opt.capitalize()}:
            toks = loaded.tokenizer(form, add_special_tokens=False).input_ids
            # A first token that is only whitespace (e.g. " 1" -> " ", "1") says nothing about
            # which option was meant.
            head = loaded.tokenizer.decode(toks[:1]).strip().lower() if toks else ""
            if head and opt.lower().startswith(head):
                ids.add(int(toks[0]))
        if not ids:
            raise ChatError(f"option {opt!r} has no usable first token for {loaded.name}")
        out.append(sorted(ids))
    for i in range(len(out)):
        for j in range(i + 1, len(out)):
            if set(out[i]) & set(out[j]):
                raise ChatError(
                    f"options {options[i]!r} and {options[j]!r} share a first token for "
                    f"{loaded.name}; they cannot be told apart from one token"
                )
    return out


def single_token_options(
    loaded: LoadedModel, prompt: Sequence[Message], options: Sequence[str]
) -> list[list[int]] | None:
    """Return one token id per option when every option is one distinct token, else None."""
    ids = [answer_tokens(loaded, [*prompt, {"role": "assistant", "content": o}]) for o in options]
    if all(len(t) == 1 for t in ids) and len({t[0] for t in ids}) == len(ids):
        return [[t[0]] for t in ids]
    return None


@torch.no_grad()
def continuation_scores(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[Message]],
    options: Sequence[Sequence[str]],
    specs: Sequence[RowSteer | None] | None = None,
    batch_size: int = 16,
    max_tokens_per_batch: int | None = 8192,
) -> ChoiceScores:
    """Return per prompt the summed log-probability of each option as the assistant's answer.

    Each (prompt, option) pair is one teacher-forced row cut right after the option's content
    tokens; specs[i] steers every row of prompt i (the prompt tokens, hence the span, are the
    same for all its options). `mass` is the total probability of the listed options.
    """
    if len(options) != len(prompts) or (specs is not None and len(specs) != len(prompts)):
        raise ValueError("prompts, options and specs must have the same length")
    flat: list[tuple[int, int, EncodedChat, int]] = []
    for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True)):
        enc = encode_chat(loaded.tokenizer, prompt, chat=loaded.chat)
        for j, opt in enumerate(opts):
            toks = answer_tokens(loaded, [*prompt, {"role": "assistant", "content": opt}])
            row = EncodedChat(enc.input_ids + toks, enc.prompt_len, None)
            flat.append((i, j, row, len(toks)))
    sums = [np.zeros(len(o)) for o in options]
    lengths = [len(f[2].input_ids) for f in flat]
    for rows in token_budget_batches(lengths, batch_size, max_tokens_per_batch):
        encs = [flat[r][2] for r in rows]
        batch = collate(encs, loaded.tokenizer.pad_token_id, "left").to(loaded.device)
        row_specs = [specs[flat[r][0]] if specs is not None else None for r in rows]
        with steer_rows(loaded, row_specs, batch.attention_mask):
            logits = loaded.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        width = batch.input_ids.shape[1]
        for k, r in enumerate(rows):
            i, j, enc, n = flat[r]
            targets = torch.tensor(enc.input_ids[-n:])
            # Token t of the option sits at column width - n + t, predicted one column earlier.
            cols = torch.arange(width - n - 1, width - 1)
            sums[i][j] = float(logp[k, cols, targets].sum())
    mass = np.array([float(np.exp(s).sum()) for s in sums])
    return ChoiceScores(sums, mass)
