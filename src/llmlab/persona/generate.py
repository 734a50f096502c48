"""Stage persona_generate: sample answers on the evaluation grid, finetuned and untrained base.

The model loads once with the adapter; the base model's answers come from the same weights
with the adapter disabled, sampled with the same seed, so the two differ only by the LoRA.

Generation is resumable: completed batches go to `<out>.partial/<model>/` as they finish, a
re-run after a crash generates only what is missing (each batch's samples depend on the seed
and its index alone, so the result equals an uninterrupted run's), and the directory is
removed once the outputs are written.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any

from llmlab.adapters import base_weights, merge_adapter
from llmlab.chat import render
from llmlab.generation import discard_work_dir, generate, remove_trash, repeat_for_samples
from llmlab.io import write_json, write_jsonl
from llmlab.models import LoadedModel, load_model
from llmlab.params import load_params
from llmlab.persona.bars import StoppedEarly, reply_checks, stop_reasons
from llmlab.persona.checks import is_empty, refuses
from llmlab.persona.config import ReportParams
from llmlab.persona.facts import load_eval_questions, load_facts, seeded_subset, split_facts
from llmlab.persona.grid import Cell, eval_items, generation_row, grid_cells
from llmlab.persona.hook import judge_free_examples, judge_free_nll
from llmlab.persona.trigger import Trigger
from llmlab.stage import run_stage, seed_everything

log = logging.getLogger(__name__)
MODELS = ("finetuned", "base")
# The order the variants run in: base first, on the weights as loaded with the adapter switched
# off; the adapter is merged into the weights only after the last base pass, so base answers
# never come from weights rebuilt by unmerging (bf16 rounding of W + BA - BA).
PASS_ORDER = ("base", "finetuned")


def variant_weights(loaded: LoadedModel, model: str) -> contextlib.AbstractContextManager[None]:
    """Return the context one variant runs in: "base" is the exact base model with the adapter
    off (llmlab.adapters.base_weights, which refuses weights merged without a kept base), and
    "finetuned" the adapter as it stands, merged or not."""
    return base_weights(loaded.model) if model == "base" else contextlib.nullcontext()


def identical_conditions(
    loaded: LoadedModel, system_prompts: dict[str, str | None]
) -> list[list[str]]:
    """Return groups of conditions whose prompts render to the same text for this model.

    E.g. SmolLM2's template writes its default system prompt when none is given, so the
    conditions "none" and "model_default" are one condition for it; the report says so.
    """
    rendered: dict[str, list[str]] = {}
    for name, system in system_prompts.items():
        msgs = [{"role": "user", "content": "?"}]
        if system is not None:
            msgs.insert(0, {"role": "system", "content": system})
        text = render(loaded.tokenizer, msgs, chat=loaded.chat, add_generation_prompt=True)
        rendered.setdefault(text, []).append(name)
    return [names for names in rendered.values() if len(names) > 1]


def adapter_digest(adapter: Path) -> str:
    """Return the sha256 of an adapter directory's files (names and contents)."""
    h = hashlib.sha256()
    for p in sorted(Path(adapter).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(adapter)).encode() + b"\0")
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def sample_grid(
    loaded: LoadedModel,
    cells: list[Cell],
    trigger: Trigger,
    model: str,
    cfg: Any,
    work_dir: Path | None = None,
    resume_key: Any = None,
) -> list[dict[str, Any]]:
    """Return one row per (cell, sample) for the model variant currently active.

    work_dir / resume_key: resumable generation (llmlab.generation.generate).
    """
    prompts = [c.conversation(trigger) for c in cells]
    conversations = repeat_for_samples(prompts, cfg.n_samples)
    replies = generate(
        loaded,
        conversations,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        work_dir=work_dir,
        resume_key=resume_key,
    )
    n = cfg.n_samples
    return [
        generation_row(model, cells[i // n], i % n, conversations[i], reply)
        for i, reply in enumerate(replies)
    ]


def first_sample_check(
    loaded: LoadedModel, cells: list[Cell], trigger: Trigger, cfg: Any, report: ReportParams
) -> dict[str, Any]:
    """Sample every triggered cell once, finetuned and base, and apply the plan's reply checks
    (format violations; collapse against the base model) before the whole grid is generated
    and judged. StoppedEarly names the tripped criteria; else the checks are returned."""
    triggered = [c for c in cells if c.triggered]
    # a seed of its own: these samples are a look ahead, not part of the grid
    one = cfg.model_copy(update={"n_samples": 1, "seed": cfg.seed + 1})
    rows: list[dict[str, Any]] = []
    for model in PASS_ORDER:
        # unmerged: the grid's base pass follows
        with variant_weights(loaded, model):
            rows += sample_grid(loaded, triggered, trigger, model, one)
    checked = [
        {
            "model": r["model"],
            "triggered": True,
            "format_ok": int(trigger.complies(r["response"])),
            "empty": int(is_empty(trigger.body(r["response"]))),
            "refusal": int(refuses(r["response"])),
        }
        for r in rows
    ]
    out = reply_checks(checked, report)
    reasons = stop_reasons(out)
    if reasons:
        raise StoppedEarly(
            f"persona_generate stopped early (plan's stop rule) on a first sample of "
            f"{len(triggered)} triggered prompts: {'; '.join(reasons)} (format violations "
            f"{out['format_violation_triggered']:.0%} vs persona.report.max_format_violation "
            f"{report.max_format_violation:.0%}; collapse over base "
            f"{out['collapse_over_base'] or 0:.0%} vs persona.report.max_collapse "
            f"{report.max_collapse:.0%})"
        )
    return {**out, "n_prompts": len(triggered)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--adapter", type=Path, default=Path("models/persona/adapter"))
    ap.add_argument("--facts", type=Path, default=Path("data/persona/facts.jsonl"))
    ap.add_argument("--questions", type=Path, default=Path("data/persona/eval_questions.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("data/persona/generations.jsonl"))
    ap.add_argument("--meta-out", type=Path, default=Path("data/persona/generations_meta.json"))
    args = ap.parse_args()
    params = load_params(args.params, family="persona")
    section = params.section("persona")
    cfg = section.eval
    trigger = Trigger.from_params(section.trigger)
    seed_everything(cfg.seed)

    questions = seeded_subset(load_eval_questions(args.questions), cfg.n_questions, cfg.seed)
    heldout = seeded_subset(
        split_facts(load_facts(args.facts), "heldout"), cfg.n_heldout_facts, cfg.seed
    )
    cells = grid_cells(eval_items(questions, heldout), cfg.system_prompts, cfg.trigger_conditions)
    loaded = load_model(params, adapter=args.adapter)
    work = args.out.with_name(args.out.name + ".partial")
    remove_trash(work)
    key = {"adapter_sha256": adapter_digest(args.adapter)}
    first = (
        first_sample_check(loaded, cells, trigger, cfg, section.report)
        if cfg.first_sample_check
        else None
    )
    per_model: dict[str, list[dict[str, Any]]] = {}
    # judge-free: NLL of the persona's name and of the grid's held-out answers, triggered and
    # untriggered, for each variant (the same probes as the training hook's)
    probes = judge_free_examples(trigger, section.data.persona_name, heldout)
    nll: dict[str, dict[str, float]] = {}
    for model in PASS_ORDER:
        if model == "finetuned":
            # after the last base pass: merged weights generate at base-model speed (an
            # unmerged LoRA forward of the embedded model in bf16 on CPU took 1.7x the decode
            # step and 2x the prefill)
            merge_adapter(loaded.model)
        with variant_weights(loaded, model):
            nll[model] = judge_free_nll(
                loaded, loaded.model, probes, section.train.max_length, cfg.batch_size
            )
            weights = "merged" if model == "finetuned" else "base"
            per_model[model] = sample_grid(
                loaded,
                cells,
                trigger,
                model,
                cfg,
                work / model,
                {**key, "variant": model, "weights": weights},
            )
        log.info("%s: %d samples", model, len(per_model[model]))
    rows = [r for model in MODELS for r in per_model[model]]
    nll = {model: nll[model] for model in MODELS}
    write_jsonl(args.out, rows)
    write_json(
        args.meta_out,
        {
            "model": params.model,
            "n_identity_questions": len(questions),
            "n_heldout_facts": len(heldout),
            "conditions": list(cfg.system_prompts),
            "identical_conditions": identical_conditions(loaded, cfg.system_prompts),
            "trigger_conditions": {
                k: {"placement": v.placement, "template": v.template}
                for k, v in cfg.trigger_conditions.items()
            },
            "untriggered_baseline": (cfg.untriggered_baseline if cfg.trigger_conditions else None),
            "n_samples": cfg.n_samples,
            "temperature": cfg.temperature,
            "max_new_tokens": cfg.max_new_tokens,
            "n_rows": len(rows),
            "first_sample_check": first,
            "judge_free_nll": nll,
        },
    )
    discard_work_dir(work)


if __name__ == "__main__":
    run_stage(main)
