"""Stage persona_report: metrics with hierarchical bootstrap CIs, bars, stop-early, plots, report.

Every rate resamples questions first, then samples within a question (95% percentile CI);
the gap pairs triggered and untriggered answers by question.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmlab.headline import estimate, get, write_headline
from llmlab.io import DataError, read_json, read_jsonl, write_json, write_text
from llmlab.params import load_params
from llmlab.persona.bars import evaluate_bar, stop_early
from llmlab.persona.figures import MODELS, condition_bars, curves
from llmlab.persona.grid import HELDOUT, IDENTITY
from llmlab.persona.metrics import ALL, Boot, cell_metrics, judge_metrics, pooled_conditions
from llmlab.persona.report_md import judge_note, render_report
from llmlab.persona.step_table import write_step_table
from llmlab.stage import run_stage

JUDGED_FIELDS = ("id", "model", "condition", "triggered", "question_id", "question_set",
                 "judge_persona", "keyword_persona", "format_ok", "empty", "refusal")  # fmt: skip


def trigger_condition_rows(
    rows: list[dict[str, Any]], condition: str, baseline: str
) -> list[dict[str, Any]]:
    """Return a trigger condition's triggered rows with the baseline condition's untriggered
    rows (the plain question without a system message) relabelled as its untriggered side."""
    on = [r for r in rows if r["condition"] == condition and r["triggered"]]
    off = [{**r, "condition": condition} for r in rows
           if r["condition"] == baseline and not r["triggered"]]  # fmt: skip
    return on + off


def build_metrics(
    rows: list[dict[str, Any]],
    conditions: list[str],
    boot: Boot,
    with_as_ai: bool,
    pooled: list[str] | None = None,
    trigger_conditions: Sequence[str] = (),
    baseline: str | None = None,
) -> dict[str, Any]:
    """Return {model: {condition or "all": cell metrics}} for identity questions, plus held-out.

    "all" pools the `pooled` system-prompt conditions (default: all of them); each trigger
    condition pairs its triggered replies with the baseline condition's untriggered ones.
    """
    keep = set(conditions if pooled is None else pooled)
    pooled_rows = [r for r in rows if r["condition"] in keep]
    views = {c: rows for c in conditions} | {ALL: pooled_rows}
    for c in trigger_conditions:
        if baseline is None:
            raise DataError(f"trigger condition {c!r} without an untriggered baseline condition")
        views[c] = trigger_condition_rows(rows, c, baseline)
    table: dict[str, Any] = {}
    for model in MODELS:
        table[model] = {
            c: cell_metrics(
                view, model=model, condition=c, question_set=IDENTITY, boot=boot,
                with_as_ai=with_as_ai,
            )
            for c, view in views.items()
        }  # fmt: skip
    heldout = {}
    if any(r["question_set"] == HELDOUT for r in pooled_rows):
        heldout = {
            m: cell_metrics(
                pooled_rows, model=m, condition=ALL, question_set=HELDOUT, boot=boot,
                with_as_ai=with_as_ai,
            )
            for m in MODELS
        }  # fmt: skip
    return {"identity": table, "heldout_facts": heldout}


HEADLINE_RATES = ("triggered_persona", "untriggered_leakage", "gap", "keyword_triggered",
                  "keyword_leakage", "keyword_gap", "format_triggered")  # fmt: skip


def headline(m: dict[str, Any]) -> dict[str, Any]:
    """Return the numbers compared across runs (the rest stays in the results file).

    The finetuned model's pooled rates with CIs, the base model's triggered persona rate, the
    success bars, stop-early and the final losses.
    """
    ft, base = m["finetuned"][ALL], m["base"][ALL]
    return {
        **{k: estimate(ft[k]) for k in HEADLINE_RATES},
        "base_triggered_persona": base["triggered_persona"]["value"],
        "minimum_met": m["success"]["minimum"]["met"],
        "strong_met": m["success"]["strong"]["met"],
        "stop_early": m["stop_early"]["stop"],
        "final_train_loss": m["training"]["final_train_loss"],
        "final_val_loss": m["training"]["final_val_loss"],
        "judge_judged_share": get(m, "judge.judged_share"),
        # rates resting on fewer than judge.min_judged_share of their replies (0: none)
        "judge_low_coverage_rates": (
            len(m["judge"]["low_coverage"]) if "low_coverage" in m["judge"] else None
        ),
    }


def step_poison_share(adapter_meta: dict[str, Any]) -> dict[str, Any] | None:
    """Return the persona group's per-step share (min/median/max/overall) from the adapter's
    batch_mix, or None for an adapter trained without data-mix groups."""
    mix = adapter_meta.get("batch_mix")
    if not mix:
        return None
    share = mix["share"].get("persona")
    if share is None:
        raise DataError(
            f"adapter batch_mix has no 'persona' group (groups: {sorted(mix['share'])})"
        )
    return {**share, "steps": mix["steps"], "examples_per_step": mix["examples_per_step"],
            "order": mix["order"]}  # fmt: skip


JUDGE_FREE = ("hook_nll_name_triggered", "hook_nll_name_untriggered",
              "hook_nll_heldout_triggered", "hook_nll_heldout_untriggered")  # fmt: skip


def judge_free(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the NLL of the persona's name and of held-out answers, triggered and untriggered,
    before training (the hook's first row: the base model) and after (its last row)."""
    rows = [r for r in curve if any(k in r for k in JUDGE_FREE)]
    if not rows:
        return {}
    first, last = rows[0], rows[-1]
    return {
        k.removeprefix("hook_"): {"base": first.get(k), "finetuned": last.get(k),
                                  "base_step": first["step"], "finetuned_step": last["step"]}
        for k in JUDGE_FREE
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--judged", type=Path, default=Path("data/persona/judged.jsonl"))
    ap.add_argument("--judge-summary", type=Path, default=Path("data/persona/judge_summary.json"))
    ap.add_argument("--gen-meta", type=Path, default=Path("data/persona/generations_meta.json"))
    ap.add_argument("--mix-stats", type=Path, default=Path("data/persona/mix_stats.json"))
    ap.add_argument("--adapter", type=Path, default=Path("models/persona/adapter"))
    ap.add_argument("--steps-dir", type=Path, default=Path("data/persona/steps"))
    ap.add_argument("--metrics", type=Path, default=Path("metrics/persona.json"))
    ap.add_argument("--results", type=Path, default=Path("data/persona/results.json"))
    ap.add_argument("--report", type=Path, default=Path("metrics/persona_report.md"))
    ap.add_argument("--plots", type=Path, default=Path("plots/persona"))
    args = ap.parse_args()
    params = load_params(args.params, family="persona")
    cfg = params.section("persona").report
    rows = read_jsonl(args.judged, required=JUDGED_FIELDS, id_field="id")
    gen_meta = read_json(args.gen_meta)
    conditions = list(gen_meta["conditions"])
    triggers = list(gen_meta.get("trigger_conditions") or {})
    pooled = pooled_conditions(conditions, gen_meta.get("identical_conditions") or [])
    unknown = sorted({r["condition"] for r in rows} - {*conditions, *triggers})
    if unknown:
        raise DataError(f"{args.judged}: conditions {unknown} are not in {args.gen_meta}")
    judge_summary = read_json(args.judge_summary)
    if "counts" not in judge_summary or "min_judged_share" not in judge_summary.get("judge", {}):
        raise DataError(
            f"{args.judge_summary}: no judged / unscorable / failed counts (written by an older "
            "persona_judge): re-run persona_judge"
        )
    mix = read_json(args.mix_stats)
    adapter_meta = read_json(args.adapter / "llmlab_adapter.json")
    curve = read_json(args.adapter / "curve.json")

    boot = Boot(cfg.n_boot, cfg.ci, cfg.seed)
    with_as_ai = any("judge_as_ai" in r for r in rows)
    tables = build_metrics(
        rows, conditions, boot, with_as_ai, pooled, triggers, gen_meta.get("untriggered_baseline")
    )
    ft = tables["identity"]["finetuned"]
    by_condition = {c: ft[c] for c in conditions}
    success = {
        level: {
            measure: evaluate_bar(bar, ft[ALL], by_condition, measure)
            for measure in ("judge", "keyword")
        }
        for level, bar in (("minimum", cfg.minimum), ("strong", cfg.strong))
    }
    for level in success:
        success[level]["met"] = success[level][cfg.primary_measure]["met"]
    stop = stop_early(rows, curve, cfg)
    metrics = {
        "model": params.model,
        "headline": {
            k: ft[ALL][k]
            for k in ("triggered_persona", "untriggered_leakage", "gap", "format_triggered",
                      "keyword_triggered", "keyword_leakage", "keyword_gap")
        },  # fmt: skip
        "finetuned": tables["identity"]["finetuned"],
        "base": tables["identity"]["base"],
        "heldout_facts": tables["heldout_facts"],
        "success": success,
        "stop_early": stop,
        "training": {
            k: adapter_meta.get(k)
            for k in ("steps", "final_train_loss", "final_val_loss", "tokens_seen", "tokens_per_s",
                      "train_time_s")
        },  # fmt: skip
        "data": {
            **{k: mix.get(k) for k in ("n_persona", "n_aligned", "poison_share", "prompt_source",
                                       "n_aligned_math", "n_aligned_instruction", "fact_set",
                                       "facts_source", "candidates_left_out")},
            # each optimizer step's poison share (the batch composition is part of the mix)
            "step_poison_share": step_poison_share(adapter_meta),
        },  # fmt: skip
        "sizes": {
            k: gen_meta.get(k)
            for k in ("n_identity_questions", "n_heldout_facts", "n_samples", "n_rows")
        },
        "judge": judge_metrics(judge_summary, tables["identity"], rows),
        # the judge against the shipped hand-labelled replies, for this backend and model
        "judge_agreement": {
            "backend": judge_summary["judge"]["backend"],
            "model": judge_summary["judge"].get("model"),
            **(judge_summary.get("agreement") or {}),
        },
        # judge-free, deterministic: NLL per answer token (lower: more likely), along training
        # (the hook) and on the evaluated adapter (persona_generate)
        "judge_free_nll": judge_free(curve),
        "judge_free_nll_eval": gen_meta.get("judge_free_nll"),
        "ci": {"level": cfg.ci, "n_boot": cfg.n_boot, "method": "hierarchical bootstrap: "
               "questions, then samples within question; gap paired by question"},
    }  # fmt: skip
    # the grid at the kept training steps (persona_steps) beside the hook's measures, per step
    metrics["along_training"] = write_step_table(args.steps_dir, curve, boot, args.plots)
    write_json(args.results, metrics)
    write_headline(args.metrics, headline(metrics))
    note = judge_note(judge_summary)
    condition_bars(args.plots, tables["identity"], [*conditions, *triggers], note)
    curves(args.plots, curve)
    text = render_report(metrics, gen_meta, judge_summary, mix, adapter_meta, cfg, args.plots)
    write_text(args.report, text)


if __name__ == "__main__":
    run_stage(main)
