"""The family's markdown report: headline tables per model and the success list."""

from __future__ import annotations

from typing import Any

from llmlab.introspection.config import VARIANT_NAMES

MODELS = ("base", *VARIANT_NAMES)


def _d_prime(d: dict) -> str:
    """Return d' with its bootstrap interval."""
    return f"{d['d_prime']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]"


def _ci(d: dict[str, Any] | None, signed: bool = False, digits: int = 2) -> str:
    if not d:
        return "—"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(d['value'])} [{f.format(d['lo'])}, {f.format(d['hi'])}]"


def _mark(met: bool | None) -> str:
    return {True: "yes", False: "no", None: "not assessable"}[met]


def judge_count_lines(m: dict[str, Any]) -> list[str]:
    """Return the judge section: judged / unscorable / failed of every judged block, and a flag
    on each rate resting on fewer than judge.min_judged_share of its planned items."""
    lines = [
        "## Judge (B3, B6)",
        "",
        "judged / unscorable (answered, answer unreadable) / failed (no answer) of planned; "
        "unscorable and failed items are kept out of the rates, never counted as no.",
        "",
        "| model | block | judged | unscorable | failed | planned |",
        "|---|---|---|---|---|---|",
    ]
    for model, blocks in m["judge_counts"].items():
        for block, c in blocks.items():
            lines.append(
                f"| {model} | {block} | {c['judged']} | {c['unscorable']} | {c['failed']} | "
                f"{c['planned']} |"
            )
    lines.append("")
    if m["judge_low_coverage"]:
        lines += [
            f"**Low judge coverage**: {len(m['judge_low_coverage'])} judged rates rest on fewer "
            "than judge.min_judged_share of their planned items: "
            + ", ".join(m["judge_low_coverage"])
            + ".",
            "",
        ]
    return lines


# What a model of this size can and cannot show, written under the report's title.
SCALE_NOTES = {
    "smollm2-135m-instruct": (
        "Model: SmolLM2-135M-Instruct on CPU, a smoke test of the pipeline at small sizes. It "
        "can show that every stage runs, that the detection variants move validation accuracy "
        "on their labels while the flipped-labels variant does not, and whether the adapters "
        "keep answering free text (the yes/no leak rate). It cannot show the plan's effects: "
        "with tens of examples a detector stays near chance, and a 135M model has no reliable "
        "self-report, identity or calibration behaviour for B2-B7 to shift. Read the success "
        "items as checks of the machinery, not as findings. What it must show is that the r=16 "
        "adapters do not collapse: the collapse check below compares each variant's free-text "
        "answers with the base model's."
    ),
}


def render_report(m: dict[str, Any]) -> str:
    """Return the markdown report of the metrics tree."""
    lines = ["# Introspection finetuning: detection of steering, five variants, B1-B7", ""]
    note = SCALE_NOTES.get(m["model"])
    lines += [f"Model: `{m['model']}`.", ""] if note is None else [note, ""]
    lines += [
        "## What success looks like (decided from the numbers)",
        "",
        "| criterion | met | evidence |",
        "|---|---|---|",
    ]
    for s in m["success"]:
        lines.append(f"| {s['criterion']} | {_mark(s['met'])} | {s['evidence']} |")
    lines += [
        "",
        "Rules: " + "; ".join(f"*{s['criterion']}*: {s['rule']}" for s in m["success"]),
        "",
    ]

    lines += [
        "## Training (same seed, lr, warmup, accumulation, clipping)",
        "",
        "| variant | r / alpha | steps | train loss first → final | val acc start → end "
        "(95% CI) | val acc vs true labels | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, t in m["training"].items():
        first = t["first_train_loss"]
        lines.append(
            f"| {v} | {t['rank']} / {t['alpha']:g} | {t['steps']} | "
            f"{first:.3f} → {t['final_train_loss']:.3f} | "
            f"{t['val_accuracy_start']:.2f} → {_ci(t['val_accuracy_end'])} | "
            f"{t['val_accuracy_true_labels_end']:.2f} | {t['train_time_s']:.0f} |"
            if first is not None and t["final_train_loss"] is not None
            else f"| {v} | {t['rank']} / {t['alpha']:g} | {t['steps']} | — | — | — | — |"
        )
    lines += ["", *adapter_origin_lines(m["training"])]
    flip = next(s for s in m["success"] if "flipped" in s["criterion"])
    lines += [
        "",
        f"Flipped-labels variant learned: **{'no' if flip['met'] else 'yes'}** "
        f"({flip['evidence']}).",
        "",
    ]

    lines += [
        "## B1 detection (accuracy [95% Wilson CI], d')",
        "",
        "| model | in-distribution | held-out | concept |",
        "|---|---|---|---|",
    ]
    for model, sets in m["b1_detection"].items():
        cells = [
            f"{_ci(sets[s]['accuracy'])}, d' {_d_prime(sets[s]['d_prime'])}"
            for s in ("in_distribution", "heldout", "concept")
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", f"d' rule: {m['d_prime_rule']}", ""]

    lines += [
        "## B2 self-attribution bias (P(yes), shift vs base [95% bootstrap CI])",
        "",
        "| model | P(yes) self-referential | shift self | shift control | "
        "absolute P(yes) self / control | shift absolute self / control | "
        "factual-control accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        b = m["b2_p_yes"][model]
        lines.append(
            f"| {model} | {_ci(b['self_referential_p_yes'])} | "
            f"{_ci(b.get('self_shift_vs_base'), True, 3)} | "
            f"{_ci(b.get('control_shift_vs_base'), True, 3)} | "
            f"{b['self_referential_p_yes_absolute']['value']:.3f} / "
            f"{b['control_p_yes_absolute']['value']:.3f} | "
            f"{_ci(b.get('self_shift_absolute_vs_base'), True, 3)} / "
            f"{_ci(b.get('control_shift_absolute_vs_base'), True, 3)} | "
            f"{b['control_accuracy']:.2f} |"
        )
    k = m["b2_p_yes"]["key_comparisons"]
    lines += [
        "",
        f"Key comparisons (self-referential P(yes), paired by question): vague − original "
        f"{_ci(k['vague_minus_original_self'], True, 3)}; food-control − original "
        f"{_ci(k['food_control_minus_original_self'], True, 3)}.",
        "",
    ]

    lines += collapse_lines(m["collapse"])
    lines += [
        "## B3-B5",
        "",
        "| model | B3 identity confusion (judge) | B3 answers only yes/no | "
        "B4 tasks beating mode baseline | "
        "B4 mean acc − baseline | B5 KL (parsed/total) | B5 KL − base | food task acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        b3 = m["b3_identity"][model]
        # Collapsed formats make the other columns unreadable: the intrusion column says so.
        b4 = m["b4_selfpred"][model]
        b5 = m["b5_calibration"][model]
        mean_diff = b4["mean_accuracy_minus_baseline"]
        lines.append(
            f"| {model} | {_ci(b3['identity_confusion_rate'])} (n={b3['n_answers']}) | "
            f"{_ci(m['b3_yes_no_intrusion'][model]['only_yes_no'])} | "
            f"{b4['n_beating_baseline']}/{b4['n_applicable']} ({b4['n_valid']} valid) | "
            f"{'—' if mean_diff is None else f'{mean_diff:+.3f}'} | "
            f"{_ci(b5['kl'])} ({b5['n_parsed']}/{b5['n_prompts']}) | "
            f"{_ci(b5.get('kl_minus_base'), True)} | "
            f"{_ci(m['food_task_accuracy'][model])} |"
        )
    lines.append("")

    if m["b6_concepts"]:
        lines += [
            "## B6 concept identification (steered context, unsteered answer)",
            "",
            "| model | judge: steered | judge: control | keyword: steered | keyword: control |",
            "|---|---|---|---|---|",
        ]
        for model, b in m["b6_concepts"].items():
            st, co = b.get("steered", {}), b.get("control", {})
            lines.append(
                f"| {model} | {_ci(st.get('judge_rate'))} | {_ci(co.get('judge_rate'))} | "
                f"{_ci(st.get('keyword_rate'))} | {_ci(co.get('keyword_rate'))} |"
            )
        lines.append("")
    if m["b7_localization"]:
        lines += [
            "## B7 localization, zero-shot (accuracy [95% CI] vs chance)",
            "",
            "| model | layer third | strength | sentence |",
            "|---|---|---|---|",
        ]
        for model, b in m["b7_localization"].items():
            cells = [
                f"{_ci(b[q]['accuracy'])} vs {b[q]['chance']:.2f}" if q in b else "—"
                for q in ("layer_third", "strength", "sentence")
            ]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    pc = m.get("phase_c")
    if pc:
        if pc.get("trained"):
            b = pc["b7_localization"]
            lines += [
                f"Phase C (trained localization, {pc['reason']}): "
                + "; ".join(
                    f"{q} {_ci(b[q]['accuracy'])} vs chance {b[q]['chance']:.2f}"
                    for q in ("layer_third", "strength", "sentence")
                    if q in b
                ),
                "",
            ]
        else:
            lines += [f"Phase C not trained: {pc['reason']}.", ""]
    lines += judge_count_lines(m)
    sizes = m["datasets"]["original"]
    lines += [
        "## Sizes and time",
        "",
        f"Training rows per variant: {sizes['train']['n']} (val {sizes['val']['n']}); "
        "evaluation wall time per model (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in m["eval_seconds"].items() if v is not None)
        + ".",
        "",
    ]
    return "\n".join(lines)


def adapter_origin_lines(training: dict[str, Any]) -> list[str]:
    """Return one line per variant saying which adapter is evaluated: selected, last or imported."""
    lines = []
    for v, t in training.items():
        imported = t.get("imported_from")
        if imported:
            lines.append(
                f"- {v}: imported from {imported['repo_id']} at commit {imported['commit']} "
                f"(not trained here); val accuracy {_ci(t['val_accuracy_end'])}"
            )
        elif t.get("selected_step") is not None:
            lines.append(
                f"- {v}: the checkpoint of step {t['selected_step']} of {t['steps']} "
                "(highest validation accuracy) is the adapter evaluated"
            )
        else:
            lines.append(f"- {v}: the adapter after the last step ({t['steps']}) is evaluated")
    return lines


def collapse_lines(c: dict[str, Any]) -> list[str]:
    """Return the collapse check: per model, leak rate, reply diversity and the verdict."""

    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:.2f}"

    lines = [
        "## Collapse check (B3 free-text answers against the base model)",
        "",
        "| model | answers | only yes/no | distinct answers | distinct-2 | distinct-2 / base | "
        "collapsed |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, r in c["models"].items():
        verdict = ("**yes**: " + "; ".join(r["reasons"])) if r["collapsed"] else "no"
        lines.append(
            f"| {model} | {r['n']} | {num(r['only_yes_no'])} | {num(r['distinct_answers'])} | "
            f"{num(r['distinct_2'])} | {num(r['distinct_2_vs_base'])} | {verdict} |"
        )
    return [*lines, "", f"Rule: {c['rule']}.", ""]
