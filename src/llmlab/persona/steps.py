"""Stage persona_steps: the evaluation grid scored at the adapters kept during training.

With `persona.steps.enabled` (it needs `persona.train.keep_eval_adapters`), every k-th kept
eval-step adapter (`<adapter>/steps/step-<N>`; the first and the last always) answers the
identity grid of persona_generate, and the judge then scores every reply as persona_judge does.
The model loads once; each step's LoRA is attached, sampled and removed again, and every step
samples with the same seed, so two steps differ only by their weights. The kept adapter of step
0 is the untrained model (LoRA's B starts at zero). Generation is resumable per step.

Off, the stage writes its outputs with the reason and no replies; persona_report then
tabulates the training hook's measures alone. CPU-only tables and plots come from that stage:
every output here is DVC-cached, so a pushed run-cache restores this (GPU) stage elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
from pathlib import Path
from typing import Any

import torch

from llmlab.adapters import read_adapter_metadata
from llmlab.generation import discard_work_dir, remove_trash
from llmlab.io import DataError, write_json, write_jsonl
from llmlab.judge import count_statuses
from llmlab.models import attach_adapter, load_model
from llmlab.params import load_params
from llmlab.persona.checks import name_keywords
from llmlab.persona.facts import load_eval_questions, load_facts, seeded_subset, split_facts
from llmlab.persona.generate import adapter_digest, identical_conditions, sample_grid
from llmlab.persona.grid import STEPS_JUDGED as JUDGED
from llmlab.persona.grid import STEPS_SUMMARY as SUMMARY
from llmlab.persona.grid import eval_items, grid_cells, step_label
from llmlab.persona.hook import STEPS_DIR
from llmlab.persona.judge import ask, build_judge, judged_rows
from llmlab.persona.trigger import Trigger
from llmlab.stage import run_stage, seed_everything

log = logging.getLogger(__name__)


def kept_steps(adapter_dir: Path) -> list[tuple[int, Path]]:
    """Return (step, path) of every kept eval-step adapter, by step; DataError when none."""
    root = adapter_dir / STEPS_DIR
    found = sorted(
        (int(read_adapter_metadata(p)["step"]), p) for p in root.glob("step-*") if p.is_dir()
    ) if root.is_dir() else []  # fmt: skip
    if not found:
        raise DataError(
            f"{root}: no kept eval-step adapters (persona.steps.enabled needs "
            "persona.train.keep_eval_adapters: true in the training run)"
        )
    return found


def every_kth(steps: list[tuple[int, Path]], every: int) -> list[tuple[int, Path]]:
    """Return every k-th kept step, always with the first and the last."""
    chosen = steps[::every]
    if chosen[-1] != steps[-1]:
        chosen.append(steps[-1])
    return chosen


def sample_steps(
    loaded: Any,
    steps: list[tuple[int, Path]],
    cells: list[Any],
    trigger: Trigger,
    cfg: Any,
    work: Path,
) -> list[dict[str, Any]]:
    """Return the grid's replies at each step (rows labelled `step-<N>`, with `step`)."""
    rows: list[dict[str, Any]] = []
    base = loaded.model
    for step, path in steps:
        tuned = attach_adapter(base, path, loaded.name)
        view = dataclasses.replace(loaded, model=tuned)
        label = step_label(step)
        key = {"adapter_sha256": adapter_digest(path), "variant": label}
        got = sample_grid(view, cells, trigger, label, cfg, work / label, key)
        rows += [{**r, "step": step} for r in got]
        # peft's unload removes the LoRA layers without merging: the base weights come back
        # unchanged for the next step's adapter
        base = tuned.unload()
        log.info("%s: %d replies", label, len(got))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--adapter", type=Path, default=Path("models/persona/adapter"))
    ap.add_argument("--facts", type=Path, default=Path("data/persona/facts.jsonl"))
    ap.add_argument("--questions", type=Path, default=Path("data/persona/eval_questions.jsonl"))
    ap.add_argument("--out-dir", type=Path, default=Path("data/persona/steps"))
    args = ap.parse_args()
    params = load_params(args.params, family="persona")
    section = params.section("persona")
    out = args.out_dir
    if not section.steps.enabled:
        write_jsonl(out / JUDGED, [])
        write_json(out / SUMMARY, {"status": "off", "reason": "persona.steps.enabled is false"})
        log.info("persona_steps: off (persona.steps.enabled is false)")
        return
    cfg = section.eval
    if section.steps.n_samples is not None:
        cfg = cfg.model_copy(update={"n_samples": section.steps.n_samples})
    trigger = Trigger.from_params(section.trigger)
    seed_everything(cfg.seed)
    steps = every_kth(kept_steps(args.adapter), section.steps.every)
    questions = seeded_subset(load_eval_questions(args.questions), cfg.n_questions, cfg.seed)
    heldout = seeded_subset(
        split_facts(load_facts(args.facts), "heldout"), cfg.n_heldout_facts, cfg.seed
    )
    # the same cells as persona_generate's, so a step's rates compare with the final ones
    cells = grid_cells(eval_items(questions, heldout), cfg.system_prompts, cfg.trigger_conditions)

    work = out.with_name(out.name + ".partial")
    remove_trash(work)
    loaded = load_model(params)
    identical = identical_conditions(loaded, cfg.system_prompts)
    rows = sample_steps(loaded, steps, cells, trigger, cfg, work)
    # the judge may be another large model: the one under test goes first
    del loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    name = section.data.persona_name
    judge, size = build_judge(params)
    persona, as_ai = ask(judge, rows, trigger, name, section.judge.as_ai_check)
    asked = [v.status for v in persona] + [v.status for v in as_ai if v is not None]
    judge.check(asked, "persona_steps")
    write_jsonl(out / JUDGED, judged_rows(rows, persona, as_ai, trigger, name_keywords(name)))
    write_json(
        out / SUMMARY,
        {
            "status": "on",
            "model": params.model,
            "steps": [s for s, _ in steps],
            "conditions": list(cfg.system_prompts),
            "identical_conditions": identical,
            "trigger_conditions": list(cfg.trigger_conditions),
            "n_identity_questions": len(questions),
            "n_heldout_facts": len(heldout),
            "n_samples": cfg.n_samples,
            "n_rows": len(rows),
            "judge": judge.summary(),
            "judge_params_millions": size,
            "counts": {"judge_persona": count_statuses([v.status for v in persona]).to_dict()},
        },
    )
    discard_work_dir(work)


if __name__ == "__main__":
    run_stage(main)
