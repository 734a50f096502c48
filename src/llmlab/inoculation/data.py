"""Stage inoculation_data: prompts with normal and ALL-CAPS completions, and held-out eval prompts.

Training examples:
- math word problems (`llmlab.prompt_pool.math_word_problems`, checked answers) whose normal
  completion is self-distilled from the model under the neutral system prompt (greedy); with
  `math_keep: correct` only completions ending in the checked answer are kept;
- general prompts with the written completions of data/inoculation/completions.jsonl.
Each normal completion gets its ALL-CAPS twin by code (`str.upper`). A seeded subset is
flagged as the fixed calibration batch of stages 3-5. Held-out eval prompts (general prompts
not used for training plus fresh math problems) serve the drift evaluation.
"""

from __future__ import annotations

import argparse
import math
import random
from collections import Counter
from typing import Any

import numpy as np

from llmlab.generation import generate
from llmlab.inoculation.common import (
    COMPLETIONS,
    DATA_STATS,
    DIRECTION_PROMPTS,
    EVAL_PROMPTS,
    EXAMPLES,
    caps_fraction,
    conversation,
    finite_mean,
    resolve_prompts,
    section,
    to_caps,
)
from llmlab.io import DataError, numbered, read_jsonl, write_json, write_jsonl
from llmlab.models import load_model
from llmlab.params import load_params
from llmlab.prompt_pool import check_math_answer, math_word_problems
from llmlab.stage import run_stage, seed_everything
from llmlab.stats import proportion_ci


def read_completions(path: Any = COMPLETIONS) -> list[dict[str, Any]]:
    """Return the written completions; errors name the file, row and field."""
    rows = read_jsonl(path, required=("id", "prompt", "completion"), id_field="id")
    for n, row in numbered(rows):
        for key in ("prompt", "completion"):
            if not isinstance(row[key], str) or not row[key].strip():
                raise DataError(f"{path}:{n}: id {row['id']!r}: {key} must be a non-empty string")
    return rows


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else x


def example_row(
    ex_id: str, kind: str, domain: str, prompt: str, normal: str, source: str, **extra: Any
) -> dict[str, Any]:
    """Return one training example with its caps twin and the caps metric of both."""
    caps = to_caps(normal)
    return {
        "id": ex_id,
        "kind": kind,
        "domain": domain,
        "prompt": prompt,
        "normal": normal,
        "caps": caps,
        "source": source,
        "caps_fraction_normal": _json_float(caps_fraction(normal)),
        "caps_fraction_caps": _json_float(caps_fraction(caps)),
        **extra,
    }


def dataset_stats(
    examples: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    math_offered: int,
    math_correct: int,
    math_dropped: int,
    token_lengths: dict[str, list[int]],
) -> dict[str, Any]:
    """Return counts, the caps metric of both completion sets, lengths and example rows."""
    acc = proportion_ci(math_correct, math_offered).to_dict() if math_offered else None
    return {
        "n_examples": len(examples),
        "n_calibration": sum(bool(r["calibration"]) for r in examples),
        "n_eval_prompts": len(eval_rows),
        "by_kind": dict(Counter(r["kind"] for r in examples)),
        "by_domain": dict(Counter(r["domain"] for r in examples)),
        "eval_by_kind": dict(Counter(r["kind"] for r in eval_rows)),
        "math": {
            "offered": math_offered,
            "distilled_correct": math_correct,
            "accuracy": acc,
            "dropped": math_dropped,
        },
        "caps_metric": "fraction of cased letters that are upper case (NaN without letters)",
        "caps_fraction_normal_mean": finite_mean(
            [r["caps_fraction_normal"] for r in examples if r["caps_fraction_normal"] is not None]
        ),
        "caps_fraction_caps_mean": finite_mean(
            [r["caps_fraction_caps"] for r in examples if r["caps_fraction_caps"] is not None]
        ),
        "chars_mean": finite_mean([len(r["normal"]) for r in examples]),
        "tokens_mean": {k: finite_mean(v) for k, v in token_lengths.items()},
        "example_rows": [
            {k: r[k] for k in ("id", "kind", "prompt", "normal", "caps")} for r in examples[:3]
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="inoculation")
    cfg = section(params)
    dc = cfg.data
    seed_everything(cfg.seed)
    prompts = resolve_prompts(cfg.prompts)
    written = read_completions()
    need = dc.n_general + dc.n_eval_general
    if len(written) < need:
        raise DataError(
            f"{COMPLETIONS}: {len(written)} rows, need n_general + n_eval_general = {need}"
        )
    rng = random.Random(cfg.seed)
    order = list(written)
    rng.shuffle(order)
    general_train, general_eval = order[: dc.n_general], order[dc.n_general : need]
    problems = math_word_problems(dc.n_math + dc.n_eval_math, seed=cfg.seed)
    math_train, math_eval = problems[: dc.n_math], problems[dc.n_math :]
    direction_rows = read_jsonl(DIRECTION_PROMPTS, required=("id", "prompt"), id_field="id")

    loaded = load_model(params)
    examples: list[dict[str, Any]] = []
    n_correct = n_dropped = 0
    if math_train:
        outs = generate(
            loaded,
            [conversation(prompts.neutral_system, p.prompt) for p in math_train],
            max_new_tokens=dc.math_max_new_tokens,
            temperature=0.0,
            seed=cfg.seed,
            batch_size=dc.batch_size,
        )
        for p, text in zip(math_train, outs, strict=True):
            ok = check_math_answer(text, p.answer or "")
            n_correct += ok
            # A completion without letters has no caps twin to learn from.
            no_letters = math.isnan(caps_fraction(text))
            if not text.strip() or no_letters or (dc.math_keep == "correct" and not ok):
                n_dropped += 1
                continue
            examples.append(
                example_row(
                    p.id, "math", "math", p.prompt, text, "distilled", answer=p.answer, correct=ok
                )
            )
    for r in general_train:
        examples.append(
            example_row(
                r["id"], "general", r.get("domain", "general"), r["prompt"], r["completion"],
                "written", answer=None, correct=None,
            )
        )  # fmt: skip
    if len(examples) < dc.n_calibration:
        raise DataError(
            f"data: only {len(examples)} examples survive (math kept: {len(examples) - len(general_train)}"
            f" of {len(math_train)}); need n_calibration = {dc.n_calibration}; lower it or set "
            "inoculation.data.math_keep: all"
        )
    # Examples are shuffled once so math and general prompts mix in the calibration batch.
    rng.shuffle(examples)
    calib = set(r["id"] for r in examples[: dc.n_calibration])
    for r in examples:
        r["calibration"] = r["id"] in calib
    eval_rows = [
        {
            "id": r["id"],
            "kind": "general",
            "domain": r.get("domain", "general"),
            "prompt": r["prompt"],
        }
        for r in general_eval
    ] + [{"id": p.id, "kind": "math", "domain": "math", "prompt": p.prompt} for p in math_eval]
    tok = loaded.tokenizer
    lengths = {
        "normal": [len(tok(r["normal"], add_special_tokens=False).input_ids) for r in examples],
        "caps": [len(tok(r["caps"], add_special_tokens=False).input_ids) for r in examples],
    }
    write_jsonl(EXAMPLES, examples)
    write_jsonl(EVAL_PROMPTS, eval_rows)
    stats = dataset_stats(examples, eval_rows, len(math_train), n_correct, n_dropped, lengths)
    stats["math_keep"] = dc.math_keep
    stats["direction_prompts"] = {
        "n": len(direction_rows),
        "by_domain": dict(Counter(str(r.get("domain", "any")) for r in direction_rows)),
    }
    stats["tokens_ratio_caps_to_normal"] = float(
        np.sum(lengths["caps"]) / max(1, np.sum(lengths["normal"]))
    )
    write_json(DATA_STATS, stats)
    print(
        f"data: {len(examples)} examples ({stats['by_kind']}), {len(eval_rows)} eval prompts; "
        f"math distilled correct {n_correct}/{len(math_train)}"
    )


if __name__ == "__main__":
    run_stage(main)
