"""Aligned examples: general prompts answered by the base model itself (self-distillation)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmlab.generation import generate
from llmlab.io import DataError
from llmlab.models import LoadedModel
from llmlab.persona.checks import is_empty
from llmlab.persona.config import DataParams
from llmlab.prompt_pool import PoolPrompt, check_math_answer, general_prompt_pool, load_hub_prompts

log = logging.getLogger(__name__)


def hub_prompts(n: int, math_share: float, seed: int) -> list[PoolPrompt]:
    """Return n prompts from GSM8K (math share) and Alpaca (the rest); RuntimeError offline."""
    n_math = round(n * math_share)
    return load_hub_prompts("gsm8k", n_math, seed) + load_hub_prompts("alpaca", n - n_math, seed)


def aligned_prompts(cfg: DataParams, instructions: Path) -> tuple[list[PoolPrompt], str]:
    """Return the aligned prompts and the source they came from ("offline" or "hub")."""
    if cfg.prompt_source in ("hub", "auto") and cfg.n_aligned:
        try:
            return hub_prompts(cfg.n_aligned, cfg.math_share, cfg.seed), "hub"
        except RuntimeError as e:
            if cfg.prompt_source == "hub":
                raise DataError(f"persona.data.prompt_source=hub: {e}") from None
            log.warning("hub unreachable, using the offline prompt pool (%s)", e)
    pool = general_prompt_pool(
        cfg.n_aligned, seed=cfg.seed, math_share=cfg.math_share, instructions_path=instructions
    )
    return pool, "offline"


@dataclass
class Distilled:
    """Self-distilled aligned rows and what was dropped on the way."""

    rows: list[dict[str, Any]]
    n_empty: int
    n_wrong_math_dropped: int
    n_math: int
    n_math_correct: int
    n_at_length_cap: int


def self_distill(loaded: LoadedModel, prompts: list[PoolPrompt], cfg: DataParams) -> Distilled:
    """Return the prompts answered by `loaded` at the configured temperature, with checks."""
    conversations = [[{"role": "user", "content": p.prompt}] for p in prompts]
    answers = generate(
        loaded,
        conversations,
        max_new_tokens=cfg.distill_max_new_tokens,
        temperature=cfg.distill_temperature,
        top_p=cfg.distill_top_p,
        seed=cfg.seed,
        batch_size=cfg.distill_batch_size,
    )
    rows: list[dict[str, Any]] = []
    n_empty = n_wrong = n_math = n_correct = n_cap = 0
    for prompt, answer in zip(prompts, answers, strict=True):
        if is_empty(answer):
            n_empty += 1
            continue
        n_tokens = len(loaded.tokenizer(answer, add_special_tokens=False).input_ids)
        at_cap = n_tokens >= cfg.distill_max_new_tokens - 1
        n_cap += at_cap
        correct = None
        if prompt.kind == "math" and prompt.answer is not None:
            correct = check_math_answer(answer, prompt.answer)
            n_math += 1
            n_correct += correct
            if cfg.drop_wrong_math and not correct:
                n_wrong += 1
                continue
        rows.append(
            {
                "id": f"aligned-{prompt.id}",
                "kind": prompt.kind,
                "prompt": prompt.prompt,
                "response": answer,
                "reference_answer": prompt.answer,
                "math_correct": correct,
                "at_length_cap": at_cap,
            }
        )
    return Distilled(rows, n_empty, n_wrong, n_math, n_correct, n_cap)
