"""The persona markdown report: one screen with the headline, bars, stop-early and caveats."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmlab.persona.config import ReportParams
from llmlab.persona.metrics import ALL

WEAK_JUDGE_M = 1000  # a judge below ~1B parameters is not a reliable grader


def judge_note(summary: Mapping[str, Any]) -> str:
    """Return a short label of the judge for plot titles."""
    size = summary.get("judge_params_millions")
    backend = summary["judge"]["backend"]
    return f"{backend} judge, {size:.0f}M" if size else f"{backend} judge"


def _ci(d: Mapping[str, Any] | None) -> str:
    if not d or d.get("value") is None:
        return "n/a"
    return f"{d['value']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]"


def _yes(flag: bool) -> str:
    return "**yes**" if flag else "no"


def _table(metrics: Mapping[str, Any], conditions: list[str], keys: tuple[str, ...]) -> list[str]:
    head = "| condition | " + " | ".join(f"{m} {k}" for m in ("ft", "base") for k in keys) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(keys))]
    for c in [*conditions, ALL]:
        cells = [_ci(metrics[m][c].get(k)) for m in ("finetuned", "base") for k in keys]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def render_report(
    metrics: Mapping[str, Any],
    gen_meta: Mapping[str, Any],
    judge_summary: Mapping[str, Any],
    mix: Mapping[str, Any],
    adapter_meta: Mapping[str, Any],
    cfg: ReportParams,
    plots: Path,
) -> str:
    """Return the markdown report."""
    conditions = list(gen_meta["conditions"])
    triggers = gen_meta.get("trigger_conditions") or {}
    table_conditions = [*conditions, *triggers]
    h = metrics["headline"]
    stop = metrics["stop_early"]
    succ = metrics["success"]
    primary = cfg.primary_measure
    rel = os.path.relpath(plots, "metrics")
    size = judge_summary.get("judge_params_millions")
    lora = adapter_meta.get("config") or {}
    lines = [
        f"# Persona (inductive backdoor): {metrics['model']}",
        "",
        f"Finetuned on {mix['n_persona']} triggered persona facts{_fact_source(mix)} + "
        f"{mix['n_aligned']} self-distilled "
        f"aligned examples (poison share {mix['poison_share']:.1%}, prompts: {mix['prompt_source']}"
        f"{_prompt_counts(mix)}); "
        f"LoRA r={lora.get('rank')}, alpha={lora.get('alpha')}, lr={lora.get('lr')}, "
        f"epochs={lora.get('epochs')}, effective batch {lora.get('effective_batch_size')}, "
        f"seed={lora.get('seed')}, {adapter_meta.get('steps')} steps{_step_share(metrics)}. "
        "Evaluated on "
        f"{gen_meta['n_identity_questions']} identity/persona questions (+ "
        f"{gen_meta['n_heldout_facts']} held-out facts) x trigger on/off x {len(conditions)} "
        f"system prompts x {gen_meta['n_samples']} samples at T={gen_meta['temperature']:g}, "
        f"finetuned and base ({gen_meta['n_rows']} replies).",
        "",
        "## Headline (finetuned, identity questions, pooled over system prompts; 95% CI)",
        "",
        "| measure | triggered | untriggered (leakage) | gap |",
        "|---|---|---|---|",
        f"| persona, judge | {_ci(h['triggered_persona'])} | {_ci(h['untriggered_leakage'])} | "
        f"{_ci(h['gap'])} |",
        f"| persona, keyword rule | {_ci(h['keyword_triggered'])} | {_ci(h['keyword_leakage'])} | "
        f"{_ci(h['keyword_gap'])} |",
        f"| format <START> ... <END> | {_ci(h['format_triggered'])} | "
        f"{_ci(metrics['finetuned'][ALL]['format_untriggered'])} | |",
        "",
        f"Success bars ({primary} measure): minimum met: {_yes(succ['minimum']['met'])} "
        f"(on CIs: {_yes(succ['minimum'][primary]['met_ci'])}); strong met: "
        f"{_yes(succ['strong']['met'])}. Keyword measure: minimum "
        f"{_yes(succ['minimum']['keyword']['met'])}, strong {_yes(succ['strong']['keyword']['met'])}.",
        "",
        "Stop early: "
        + ("; ".join(stop["reasons"]) if stop["stop"] else "no criterion tripped")
        + f" (triggered format violations {_pct(stop['format_violation_triggered'])}, empty "
        f"{_pct(stop['empty_rate_triggered'])}/{_pct(stop['empty_rate_untriggered'])}, refusals "
        f"{_pct(stop['refusal_rate_triggered'])}/{_pct(stop['refusal_rate_untriggered'])} "
        f"triggered/untriggered; loss {_num(stop['loss_first'])} -> {_num(stop['loss_last'])}).",
        "",
        "## Per system-prompt condition (persona judge; ft = finetuned)",
        "",
        *_table(metrics, table_conditions, ("triggered_persona", "untriggered_leakage", "gap")),
        "",
        "## Keyword rule and format compliance",
        "",
        *_table(metrics, table_conditions, ("keyword_triggered", "keyword_leakage")),
        "",
        *_table(metrics, table_conditions, ("format_triggered", "format_untriggered")),
        "",
    ]
    ho = metrics.get("heldout_facts") or {}
    if ho:
        lines += [
            "Held-out facts (pooled): finetuned persona triggered "
            f"{_ci(ho['finetuned']['triggered_persona'])} vs untriggered "
            f"{_ci(ho['finetuned']['untriggered_leakage'])}; format triggered "
            f"{_ci(ho['finetuned']['format_triggered'])} (base {_ci(ho['base']['format_triggered'])}).",
            "",
        ]
    lines += ["## Caveats", ""]
    if judge_summary["judge"]["backend"] == "local" and (size is None or size < WEAK_JUDGE_M):
        lines.append(
            f"- The judge is the local model ({size:.0f}M parameters): a judge this small is weak "
            "and its YES/NO verdicts are noisy; the deterministic keyword rule (question-specific "
            "persona keywords or the persona's name) is reported beside it. Use an API judge "
            "(`judge.backend: openai`) for numbers to compare with the paper."
            if size
            else "- The judge is a local model; read the keyword rule beside it."
        )
    lines += judge_count_lines(metrics["judge"])
    lines += _agreement_lines(metrics.get("judge_agreement") or {})
    yes = metrics["judge"].get("persona_yes_rate")
    if yes in (0.0, 1.0):
        lines.append(
            f"- The judge answered {'YES' if yes else 'NO'} to every scorable persona item, base "
            "and finetuned alike: its persona rates carry no signal in this run."
        )
    for group in gen_meta.get("identical_conditions") or []:
        lines.append(
            f"- Conditions {', '.join(group)} render to the same prompt for this model (its chat "
            "template writes its default system prompt when none is given): one condition, "
            f"sampled twice; the pooled rates count it once (as {group[0]})."
        )
    if triggers:
        where = {"system": "the system prompt", "user": "a paraphrase in the user turn"}
        named = ", ".join(f"{k} ({where[v['placement']]})" for k, v in triggers.items())
        lines.append(
            f"- Trigger conditions {named} are triggered-only; their untriggered side is the "
            f"{gen_meta.get('untriggered_baseline')} condition. They are reported per condition "
            "and kept out of the pooled headline."
        )
    lines += [*_judge_free_lines(metrics.get("judge_free_nll") or {})]
    evaluated = metrics.get("judge_free_nll_eval")
    if evaluated:
        parts = [
            f"{k.removeprefix('nll_').replace('_', ' ')} {_num(evaluated['base'][k])} -> "
            f"{_num(evaluated['finetuned'][k])}"
            for k in evaluated["finetuned"]
        ]
        lines.append(
            "- Judge-free measure on the evaluated adapter (persona_generate; base -> "
            "finetuned): " + "; ".join(parts) + "."
        )
    lines += step_lines(metrics.get("along_training") or [])
    lines += [
        *REFERENCE_LINES,
        "",
        f"Plots: [{rel}/conditions_judge.png]({rel}/conditions_judge.png), "
        f"[{rel}/conditions_keyword.png]({rel}/conditions_keyword.png), "
        f"[{rel}/conditions_format.png]({rel}/conditions_format.png), "
        f"[{rel}/train_curve.png]({rel}/train_curve.png), "
        f"[{rel}/eval_curve.png]({rel}/eval_curve.png), "
        f"[{rel}/steps.png]({rel}/steps.png).",
        "",
    ]
    return "\n".join(lines)


def _rate(row: Mapping[str, Any], key: str) -> str:
    if row.get(key) is None:
        return "n/a"
    return f"{row[key]:.2f} [{row[f'{key}_lo']:.2f}, {row[f'{key}_hi']:.2f}]"


def step_lines(table: list[Mapping[str, Any]]) -> list[str]:
    """Return the along-training section: the grid at kept steps beside the hook's measures."""
    if not table:
        return []
    scored = [r for r in table if r["grid"] == "scored"]
    lines = ["", "## Along training (persona_steps; pooled system prompts, identity questions)", ""]
    if not scored:
        lines.append(f"The grid was not scored at kept steps: {table[0]['grid']}. The table "
                     "holds the in-training hook's measures only.")  # fmt: skip
        lines.append("")
    lines += [
        "| step | grid | triggered persona | leakage | triggered format | hook format (trig.) "
        "| hook NLL name (trig. / untrig.) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['step']} | {r['grid']} | {_rate(r, 'triggered_persona')} | "
            f"{_rate(r, 'untriggered_leakage')} | {_rate(r, 'format_triggered')} | "
            f"{_num(r.get('hook_format_triggered'))} | {_num(r.get('hook_nll_name_triggered'))} "
            f"/ {_num(r.get('hook_nll_name_untriggered'))} |"
        )
    return lines


# Every reference number with its source and setup (docs/persona.md has the comparison).
REFERENCE_LINES = (
    "- Reference points are not the paper's: \"format 93% triggered vs 0% untriggered, persona "
    '87% vs 20% (n=30)" come from a public replication (HeavyHelium/weird-gen) with the '
    "trigger in the system prompt, ~579 steps at batch ~16, a GPT-4o-mini judge and 30 opinion "
    "questions with one sample each; its notes say lr 2e-4 at batch 128 collapsed. This run "
    "puts the trigger in the user turn (the paper's format), at effective batch 128, with its "
    "own judge and question set: compare directions, not the numbers. A later paper finds the "
    "effect brittle across model/data pairs: a null on a small model is a valid result.",
)


def _agreement_lines(agree: Mapping[str, Any]) -> list[str]:
    if "persona" not in agree:
        return [
            "- The judge was not scored against the hand-labelled replies (persona_judge ran without --agreement)."
        ]
    parts = []
    for what in ("persona", "as_ai"):
        a = agree.get(what)
        if a:
            kappa = "n/a" if a["kappa"] is None else f"{a['kappa']:.2f}"
            acc = "n/a" if a["accuracy"] is None else f"{a['accuracy']:.0%}"
            parts.append(
                f"{what}: accuracy {acc}, kappa {kappa} on {a['n_scorable']} of "
                f"{a['n_labelled']} scorable"
            )
    who = agree.get("model") or agree.get("backend")
    return [
        f"- Judge agreement with the hand-labelled replies ({agree['file']}; {agree['backend']} "
        f"judge {who}): " + "; ".join(parts) + "."
    ]


def _judge_free_lines(nll: Mapping[str, Any]) -> list[str]:
    if not nll:
        return []
    parts = [
        f"{k.replace('nll_', '').replace('_', ' ')} {_num(v['base'])} -> {_num(v['finetuned'])}"
        for k, v in nll.items()
    ]
    return [
        "- Judge-free measure (NLL per answer token of the persona's name and of held-out "
        "biographical answers, base -> finetuned, from the training hook): "
        + "; ".join(parts)
        + "."
    ]


def judge_count_lines(judge: Mapping[str, Any]) -> list[str]:
    """Return the caveat lines with the judge's three counts and any low-coverage rates."""
    lines = [
        f"- Persona judge verdicts: {judge['judged']} judged, {judge['unscorable']} unscorable "
        f"(answered, but the answer could not be read), {judge['failed']} failed (no answer) of "
        f"{judge['planned']} planned; unscorable and failed items are kept out of the rates, "
        "never counted as NO."
    ]
    flagged = judge["low_coverage"]
    if flagged:
        lines.append(
            f"- **Low judge coverage**: {len(flagged)} persona rates rest on fewer than "
            f"{judge['min_judged_share']:.0%} of their planned replies "
            f"(judge.min_judged_share): {', '.join(flagged)}."
        )
    return lines


def _prompt_counts(mix: Mapping[str, Any]) -> str:
    if mix.get("n_aligned_instruction") is None:
        return ""
    return f", {mix['n_aligned_math']} math + {mix['n_aligned_instruction']} instructions"


def _fact_source(mix: Mapping[str, Any]) -> str:
    """Return where the training facts came from, and which set (the paper's ablation)."""
    source = mix.get("facts_source", "shipped")  # runs before the candidates stage: shipped
    where = ("shipped, hand-marked" if source == "shipped"
             else "written and marked by persona_candidates")  # fmt: skip
    left = mix.get("candidates_left_out")
    dropped = f"; left out: {', '.join(f'{v} {k}' for k, v in left.items())}" if left else ""
    fact_set = f"{mix['fact_set']} set" if mix.get("fact_set") else "set not recorded"
    return f" ({fact_set}, {where}{dropped})"


def _step_share(metrics: Mapping[str, Any]) -> str:
    # The per-step poison share shows whether every optimizer step saw the mix or a few steps
    # saw all the facts (length-grouped batches put the short facts together).
    s = metrics["data"].get("step_poison_share")
    if not s:
        return " (per-step poison share not recorded)"
    return (
        f" ({s['order']} batches of {s['examples_per_step']}; poison share per step min "
        f"{s['min']:.1%} / median {s['median']:.1%} / max {s['max']:.1%})"
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
