"""Stage introspection_eval@<model>: evaluations B1-B7 of one model (a variant or the base).

Writes `<out>/<model>/` with one JSONL of records per evaluation (answers saved for reading)
and `summary.json` holding every evaluation's summary, its sizes and its run time.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmlab.introspection.calibration import calibration_records, calibration_summary
from llmlab.introspection.config import IntrospectionParams
from llmlab.introspection.data import load_questions
from llmlab.introspection.eval_concepts import concept_records, concept_summary
from llmlab.introspection.eval_detection import (
    detection_summary,
    food_summary,
    yes_no_trials,
)
from llmlab.introspection.eval_identity import identity_records, identity_summary
from llmlab.introspection.eval_localization import (
    load_b7_questions,
    localization_records,
    localization_summary,
)
from llmlab.introspection.eval_logprobs import load_behavioural, p_yes_records, p_yes_summary
from llmlab.introspection.eval_selfpred import load_selfpred, selfpred_records, selfpred_summary
from llmlab.introspection.examples import read_rows
from llmlab.introspection.judging import make_family_judge
from llmlab.introspection.vectors import VectorBank, load_vectors
from llmlab.io import read_jsonl, replace_dir, write_json, write_jsonl
from llmlab.models import LoadedModel

B1_SETS = ("in_distribution", "heldout", "concept")
BASE = "base"


def question_set(cfg: IntrospectionParams, model: str) -> str:
    """Return the detection question set a model is asked (its training set; base: original)."""
    if model == BASE:
        return "original"
    v = cfg.variants[model]
    return "original" if v.task == "food" else v.questions


class Runner:
    """Runs evaluation blocks, timing them and writing their records and summaries."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.summary: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}

    def block(
        self,
        name: str,
        records_fn: Callable[[], list[dict[str, Any]]],
        summary_fn: Callable[[list[dict[str, Any]]], dict[str, Any]],
    ) -> None:
        """Run one evaluation, save its records and keep its summary."""
        t0 = time.perf_counter()
        records = records_fn()
        write_jsonl(self.out_dir / f"{name}.jsonl", records)
        self.summary[name] = summary_fn(records)
        self.seconds[name] = round(time.perf_counter() - t0, 2)


def run_all(
    loaded: LoadedModel,
    bank: VectorBank,
    cfg: IntrospectionParams,
    judge_cfg: Any,
    model: str,
    data: Path,
    eval_sets: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """Return the model's summary after running every evaluation that applies to it."""
    e, reply, seed = cfg.eval, cfg.data.context_reply, cfg.eval.seed
    prefix = cfg.data.answer_prefix
    questions = load_questions(data / "detection_questions.json")
    qset = question_set(cfg, model)
    run = Runner(out_dir)
    if model not in e.b1.skip:
        for s in B1_SETS:
            trials = read_rows(eval_sets / f"b1_{s}.jsonl", required=("id", "context", "steered"))
            run.block(
                f"b1_{s}",
                lambda t=trials: yes_no_trials(
                    loaded, bank, t, questions[qset], reply, e.batch_size, prefix
                ),
                detection_summary,
            )
    food = read_rows(eval_sets / "food.jsonl", required=("id", "context", "label"))
    run.block(
        "food_task",
        lambda: yes_no_trials(loaded, None, food, questions["food"], reply, e.batch_size, prefix),
        food_summary,
    )
    beh = load_behavioural(data / "behavioural_questions.jsonl")
    run.block(
        "b2_logprobs",
        lambda: p_yes_records(loaded, beh, e.batch_size),
        lambda r: p_yes_summary(r, seed),
    )
    judge = make_family_judge(judge_cfg, loaded, cfg.judge_max_new_tokens)
    ident = read_jsonl(
        data / "identity_questions.jsonl", required=("id", "question"), id_field="id"
    )
    run.block(
        "b3_identity",
        lambda: identity_records(loaded, judge, ident, e.b3, e.batch_size, seed),
        lambda r: identity_summary(r, seed),
    )
    sp = load_selfpred(data / "selfpred", e.b4.n_per_dataset)
    run.block(
        "b4_selfpred", lambda: selfpred_records(loaded, sp, e.b4, e.batch_size), selfpred_summary
    )
    calib = read_jsonl(data / "calibration_prompts.jsonl", required=("id", "prompt"), id_field="id")
    run.block(
        "b5_calibration",
        lambda: calibration_records(loaded, calib, e.b5, e.batch_size, seed, e.b5.kl_eps),
        lambda r: calibration_summary(r, seed),
    )
    if model in e.b6.models:
        b6 = read_rows(eval_sets / "b6.jsonl", required=("id", "context", "question"))
        run.block(
            "b6_concepts",
            lambda: concept_records(
                loaded, bank, judge, b6, reply, e.b6.max_new_tokens, e.batch_size
            ),
            lambda r: concept_summary(r, seed),
        )
    if model in e.b7.models:
        b7q = load_b7_questions(data / "b7_questions.json")
        b7 = read_rows(eval_sets / "b7.jsonl", required=("id", "context", "question_id", "answer"))
        run.block(
            "b7_localization",
            lambda: localization_records(loaded, bank, b7, b7q, reply, e.batch_size),
            localization_summary,
        )
    return {
        "model": model,
        "base_model": loaded.name,
        "question_set": qset,
        "evaluations": run.summary,
        "seconds": run.seconds,
        "judge": judge.summary(),
    }


def main() -> None:
    from llmlab.adapters import merge_adapter
    from llmlab.judge import JudgeConfig
    from llmlab.models import load_model
    from llmlab.params import ParamsError, load_params

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="'base' or a variant name")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/introspection")
    ap.add_argument("--vectors", default="data/introspection/vectors")
    ap.add_argument("--eval-sets", default="data/introspection/eval_sets")
    ap.add_argument("--adapters", default="models/introspection")
    ap.add_argument("--out", default="data/introspection/eval")
    args = ap.parse_args()
    params = load_params(args.params, family="introspection")
    cfg: IntrospectionParams = params.section("introspection")
    if args.model != BASE and args.model not in cfg.variants:
        raise ParamsError(f"{params.path}: introspection.variants has no {args.model!r}")
    adapter = None if args.model == BASE else Path(args.adapters) / args.model
    t0 = time.perf_counter()
    loaded = load_model(params, adapter=adapter)
    judge_cfg = params.sections.get("judge") or JudgeConfig()
    if adapter is not None:
        # Merged LoRA weights run at base-model speed. A local judge is the base model: it runs
        # on a kept copy of the exact base weights (llmlab.adapters.base_weights).
        merge_adapter(loaded.model, keep_base=judge_cfg.backend == "local")
    bank = load_vectors(args.vectors, loaded)
    out_dir = Path(args.out) / args.model
    # Records go to a *.partial directory renamed over the old output only once every
    # evaluation (and its judge check) passed: a failed judge leaves the previous results.
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    summary = run_all(
        loaded, bank, cfg, judge_cfg, args.model, Path(args.data), Path(args.eval_sets), work
    )
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    write_json(work / "summary.json", summary)
    replace_dir(work, out_dir)


if __name__ == "__main__":
    from llmlab.stage import run_stage

    run_stage(main)
