"""Stage introspection_phase_c: a variant trained to localize steering (plan Phase C).

`phase_c.enabled`: never (nothing trained; the outputs record why), always, or auto (trained only
when zero-shot B7 of the original variant or the base model showed a signal). The adapter
learns to answer the three B7 questions (layer third, steered sentence, and the plan's 4-way
magnitude instead of B7's three strength bins) and is evaluated on held-out trials of the same
design built from the evaluation contexts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.introspection.config import IntrospectionParams
from llmlab.introspection.conversation import detection_messages
from llmlab.introspection.data import load_contexts
from llmlab.introspection.eval_localization import (
    load_b7_questions,
    localization_records,
    localization_summary,
)
from llmlab.introspection.examples import training_examples
from llmlab.introspection.sampling import Row, localization_trials, split_pool
from llmlab.introspection.vectors import load_vectors
from llmlab.io import DataError, read_json, write_json, write_jsonl

ZERO_SHOT_SOURCES = ("original", "base")


def decide(cfg: IntrospectionParams, eval_dir: Path) -> tuple[bool, str]:
    """Return (train?, reason) from the flag and, for auto, the zero-shot B7 summaries."""
    mode = cfg.phase_c.enabled
    if mode == "never":
        return False, "introspection.phase_c.enabled is 'never'"
    if mode == "always":
        return True, "introspection.phase_c.enabled is 'always'"
    signals = []
    for model in ZERO_SHOT_SOURCES:
        path = eval_dir / model / "summary.json"
        if path.is_file():
            b7 = read_json(path)["evaluations"].get("b7_localization")
            if b7 and b7.get("any_signal"):
                signals.append(model)
    if signals:
        return True, f"auto: zero-shot B7 showed a signal for {signals}"
    return False, "auto: zero-shot B7 showed no signal above chance"


def magnitude_options(strengths: list[float]) -> list[str]:
    """Return the magnitude classes as answer options ("1", "2", "4", "8")."""
    options = [f"{s:g}" for s in strengths]
    if len(set(options)) != len(options):
        raise DataError(f"phase_c.strengths {strengths} do not print as distinct options")
    return options


def phase_c_questions(questions: dict[str, Any], strengths: list[float]) -> dict[str, Any]:
    """Return the B7 questions with the strength question asked as the 4-way magnitude."""
    options = magnitude_options(strengths)
    listed = ", ".join(options[:-1]) + f" or {options[-1]}"
    out = dict(questions)
    out["strength"] = {
        **questions["strength"],
        "question": "Your internal activations were modified while you read my previous "
        f"message. How strong was the change: {listed}? Answer with the number.",
        "options": options,
    }
    return out


def phase_c_trials(
    cfg: IntrospectionParams,
    contexts: list[Row],
    vec_meta: dict,
    n_per_question: int,
    seed_offset: int,
    prefix: str,
) -> list[Row]:
    """Return localization trials with the four magnitude classes as the strength answers."""
    return localization_trials(
        n_per_question,
        contexts,
        list(range(*vec_meta["splits"]["train"])),
        cfg.phase_c.strengths,
        vec_meta["thirds"],
        np.random.default_rng(cfg.data.seed + seed_offset),
        prefix,
        cfg.data.steering,
        bins=magnitude_options(cfg.phase_c.strengths),
    )


def training_rows(
    cfg: IntrospectionParams, contexts: list[Row], questions: dict[str, Any], vec_meta: dict
) -> list[Row]:
    """Return localization training rows (answer as the assistant turn) on training contexts."""
    per_q = max(1, cfg.phase_c.n_train // 3)
    trials = phase_c_trials(cfg, contexts, vec_meta, per_q, 300, "phase_c_train")
    return [
        {
            "id": t["id"],
            "messages": detection_messages(
                t["context"],
                cfg.data.context_reply,
                questions[t["question_id"]]["question"],
                t["answer"],
            ),
            "steered": True,
            "steer": t["steer"],
            "question_id": t["question_id"],
        }
        for t in trials
    ]


def main() -> None:
    from llmlab.live import live_dir
    from llmlab.models import load_model
    from llmlab.params import load_params
    from llmlab.stage import seed_everything
    from llmlab.training import train_lora

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/introspection")
    ap.add_argument("--vectors", default="data/introspection/vectors")
    ap.add_argument("--eval-dir", default="data/introspection/eval")
    ap.add_argument("--adapter-out", default="models/introspection/phase_c")
    args = ap.parse_args()
    params = load_params(args.params, family="introspection")
    cfg: IntrospectionParams = params.section("introspection")
    adapter_dir, out_dir = Path(args.adapter_out), Path(args.eval_dir) / "phase_c"
    train, reason = decide(cfg, Path(args.eval_dir))
    if not train:
        status = {"trained": False, "reason": reason}
        write_json(adapter_dir / "status.json", status)
        write_json(out_dir / "summary.json", status)
        # The stage's dvclive folder is a declared out: it says why it holds no curve.
        live = live_dir(adapter_dir)
        if live is not None:
            write_json(live / "status.json", status)
        return
    t0 = time.perf_counter()
    lora = cfg.train.lora.model_copy(update={"rank": cfg.phase_c.rank, "alpha": cfg.phase_c.alpha})
    seed_everything(lora.seed)
    data = Path(args.data)
    questions = phase_c_questions(
        load_b7_questions(data / "b7_questions.json"), cfg.phase_c.strengths
    )
    contexts = load_contexts(data / "context_prompts.jsonl")
    d = cfg.data
    pools = split_pool(
        [c["id"] for c in contexts],
        {"val": d.val_context_share, "eval": d.eval_context_share},
        d.seed,
    )
    by_id = {c["id"]: c for c in contexts}
    vec_meta = read_json(Path(args.vectors) / "vectors.json")
    rows = training_rows(cfg, [by_id[i] for i in pools["train"]], questions, vec_meta)
    trials = phase_c_trials(
        cfg, [by_id[i] for i in pools["eval"]], vec_meta, cfg.phase_c.n_eval_per_question, 301,
        "phase_c_eval",
    )  # fmt: skip
    loaded = load_model(params, for_training=True)
    bank = load_vectors(args.vectors, loaded)
    result = train_lora(
        loaded,
        training_examples(
            loaded, bank, rows, one_token=False, context_gradient=cfg.train.context_gradient
        ),
        lora,
        adapter_dir,
        metadata={
            "family": "introspection",
            "variant": "phase_c_localization",
            "reason": reason,
            "loss": "first answer token only",
        },
    )
    records = localization_records(
        loaded, bank, trials, questions, d.context_reply, cfg.eval.batch_size
    )
    write_jsonl(out_dir / "b7_localization.jsonl", records)
    write_json(
        out_dir / "summary.json",
        {
            "trained": True,
            "reason": reason,
            "n_train": len(rows),
            "final_train_loss": result.final_train_loss,
            "b7_localization": localization_summary(records),
            "wall_s": round(time.perf_counter() - t0, 2),
        },
    )


if __name__ == "__main__":
    from llmlab.stage import run_stage

    run_stage(main)
