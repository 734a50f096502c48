"""Stage inoculation_report: the four acceptance criteria, the verdict, metrics and a short report.

Reads every earlier stage's output, evaluates the plan's criteria (`llmlab.inoculation.criteria`)
with paired bootstrap intervals, writes the results tree to data/inoculation/results.json, its
headline to metrics/inoculation.json, the scatter of mean training alignment against final drift,
and metrics/inoculation_report.md.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

import numpy as np

from llmlab.headline import estimate, write_headline, write_results
from llmlab.inoculation.alignment import ARRAYS_FILE, SUMMARY_FILE
from llmlab.inoculation.alignment import draw_plots as alignment_plots
from llmlab.inoculation.common import (
    ALIGNMENT_DIR,
    BASELINE_CONDITION,
    CONTROL_TABLE,
    DATA_STATS,
    DIRECTION_DIR,
    DRIFT_DIR,
    METRICS,
    MODELS_DIR,
    PLOTS_DIR,
    REPORT,
    SPECIFICITY,
    section,
)
from llmlab.inoculation.config import CANONICAL_POSITION
from llmlab.inoculation.criteria import (
    ci_below_zero,
    criterion_beyond_control,
    criterion_decrease,
    criterion_predicts_drift,
    criterion_specific,
    fmt_est,
    verdict,
)
from llmlab.inoculation.direction import draw_plots as direction_plots
from llmlab.inoculation.drift import DRIFT_FILE, standardised_shift
from llmlab.inoculation.drift import draw_plots as drift_plots
from llmlab.inoculation.finetune import RUNS_FILE
from llmlab.inoculation.finetune import draw_plots as finetune_plots
from llmlab.io import read_json, read_jsonl, write_text
from llmlab.params import load_params
from llmlab.plots import scatter_plot, write_series
from llmlab.stage import run_stage
from llmlab.stats import bootstrap_diff, crossed_bootstrap_diff


def paired(
    a: np.ndarray, b: np.ndarray, ids: list[str], n_boot: int, ci: float, seed: int
) -> dict[str, Any]:
    """Return mean(a - b) over the same examples with a paired bootstrap interval."""
    return bootstrap_diff(
        {i: [float(v)] for i, v in zip(ids, a, strict=True)},
        {i: [float(v)] for i, v in zip(ids, b, strict=True)},
        paired=True,
        n_boot=n_boot,
        ci=ci,
        seed=seed,
    ).to_dict()


def caps_by_model(rows: list[dict[str, Any]], test_prompt: str) -> dict[str, dict[str, float]]:
    """Return {model: {prompt id: caps fraction (NaN when unscorable)}} under one test prompt."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r.get("test_prompt") != test_prompt:
            continue
        c = r.get("caps_fraction")
        out[r["model"]][r["id"]] = float("nan") if c is None else float(c)
    return out


def drift_difference(
    caps: dict[str, dict[str, float]],
    a_runs: list[str],
    b_runs: list[str],
    n_boot: int,
    ci: float,
    seed: int,
) -> dict[str, Any] | None:
    """Return caps(a runs) - caps(b runs), paired over prompts, seeds and prompts resampled crossed.

    Resampling the runs (training seeds) of each side as well as the prompts puts
    between-seed variance in the interval (see `llmlab.stats.crossed_bootstrap_diff`).
    """
    if not a_runs or not b_runs:
        return None
    ids = sorted(caps[a_runs[0]])
    try:
        return crossed_bootstrap_diff(
            [[caps[r][i] for i in ids] for r in a_runs],
            [[caps[r][i] for i in ids] for r in b_runs],
            n_boot=n_boot,
            ci=ci,
            seed=seed,
        ).to_dict()
    except ValueError:
        return None


def per_layer_paired(
    a: np.ndarray, b: np.ndarray, ids: list[str], layers: list[int], **boot: Any
) -> list[dict[str, Any]]:
    """Return the paired (a - b) estimate per layer; a, b: [N, L] alignments over the same ids."""
    return [
        {"layer": layer, **paired(a[:, li], b[:, li], ids, **boot)}
        for li, layer in enumerate(layers)
    ]


def projection_shifts(path: Any, runs: list[str]) -> dict[str, np.ndarray]:
    """Return {run: per-prompt layer-mean projection shift onto v_l in base-SD units [P]}."""
    with np.load(path) as z:
        base = z["base"]
        return {r: standardised_shift(z[r], base).mean(axis=1) for r in runs}


def run_difference(
    per_run: dict[str, np.ndarray], a_runs: list[str], b_runs: list[str], **boot: Any
) -> dict[str, Any] | None:
    """Return mean(a runs) - mean(b runs) over prompts, seeds and prompts resampled crossed."""
    if not a_runs or not b_runs:
        return None
    try:
        return crossed_bootstrap_diff(
            [per_run[r] for r in a_runs], [per_run[r] for r in b_runs], **boot
        ).to_dict()
    except ValueError:
        return None


def seed_schedule(
    runs: list[dict[str, Any]], c1_pass: bool, inoc_minus_neutral_caps: dict[str, Any] | None
) -> dict[str, Any]:
    """Return the plan's seed sequencing: one seed per condition first, three if the effect shows.

    The effect is present when criterion 1 passes or inoculation drifts less in caps than
    neutral (paired CI below 0).
    """
    per_cond = [
        sum(r["condition"] == c for r in runs) for c in ("neutral", "inoculation", "loss_matched")
    ]
    n = min(per_cond)
    effect = bool(c1_pass or (inoc_minus_neutral_caps and ci_below_zero(inoc_minus_neutral_caps)))
    if n >= 3:
        step, line = "done", f"{n} seeds per condition"
    elif effect:
        step = "expand"
        line = (
            f"effect present after {n} seed(s) per condition: rerun with "
            "inoculation.finetune.seeds=[0,1,2]"
        )
    else:
        step = "stop"
        line = f"no effect after {n} seed(s) per condition; more seeds are optional"
    return {"seeds_per_condition": n, "effect_present": effect, "next_step": step, "line": line}


def headline(m: dict[str, Any]) -> dict[str, Any]:
    """Return the numbers compared across runs (at most 30; the rest stays in the results file).

    The verdict and its four criteria with the estimate behind each, the loss shift, the
    drift read against the normal-completion baseline, and the direction's four checks.
    """
    crit, align = m["criteria"], m["alignment"]
    base = m["drift"]["by_condition"].get("inoculation", {})
    return {
        "verdict_claim": m["verdict"] == "claim",
        **{f"{key}_pass": c["pass"] for key, c in crit.items()},
        "align_inoculation_minus_neutral": estimate(align["inoculation_minus_neutral"]),
        "align_inoculation_minus_control": estimate(align["inoculation_minus_control"]),
        "loss_inoculation_minus_neutral": estimate(m["loss"]["inoculation_minus_neutral"]),
        "drift_inoculation_minus_control_projection": estimate(
            crit["c4_predicts_drift"]["projection_inoculation_minus_control"]
        ),
        "drift_inoculation_minus_neutral_caps": estimate(
            m["drift"]["inoculation_minus_neutral_caps"]
        ),
        "drift_inoculation_minus_baseline_projection": estimate(
            base.get("projection_shift_minus_baseline")
        ),
        "specificity_percentile": m["specificity"]["layer_mean_percentile"],
        "specificity_worst_null_percentile": crit["c3_specific"]["worst_percentile"],
        "direction_separation_pass": m["direction"]["separation_pass"],
        "direction_correlation_pass": m["direction"]["correlation_pass"],
        "direction_promote_caps_pass": m["direction"]["promote_produces_caps_pass"],
        "direction_steering_pass": m["direction"]["steering_raises_caps_pass"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="inoculation")
    cfg = section(params)
    rc = cfg.report
    stats = read_json(DATA_STATS)
    sanity = read_json(DIRECTION_DIR / "sanity.json")
    summary = read_json(ALIGNMENT_DIR / SUMMARY_FILE)
    table = read_json(CONTROL_TABLE)
    spec = read_json(SPECIFICITY)
    runs_doc = read_json(MODELS_DIR / RUNS_FILE)
    drift = read_json(DRIFT_DIR / DRIFT_FILE)
    gens = read_jsonl(DRIFT_DIR / "generations.jsonl", required=("model", "id"))

    names = [c["name"] for c in summary["conditions"]]
    ids = summary["example_ids"]
    canon = summary["positions"].index(CANONICAL_POSITION)
    with np.load(ALIGNMENT_DIR / ARRAYS_FILE) as z:
        cos, loss = z["cos"], z["loss"]
    align = -cos[:, :, :, canon].mean(axis=2)  # [C, N] layer-mean trait-ward alignment
    neu, ino, ctl = names.index("neutral"), names.index("inoculation"), names.index(table["chosen"])
    boot = {"n_boot": rc.n_boot, "ci": rc.ci, "seed": cfg.seed}
    d_ino_neu = paired(align[ino], align[neu], ids, **boot)
    layer_align = -cos[:, :, :, canon]  # [C, N, L]
    layers = [int(x) for x in summary["layers"]]
    # Criterion 2 on the half the control was not chosen on (see inoculation.control).
    held = [ids.index(i) for i in table["evaluation_ids"]]
    d_ino_ctl = paired(align[ino][held], align[ctl][held], table["evaluation_ids"], **boot)
    d_ctl_neu = paired(align[ctl], align[neu], ids, **boot)
    d_loss = paired(loss[ino], loss[neu], ids, **boot)
    d_loss_ctl = paired(loss[ctl], loss[ino], ids, **boot)

    caps = caps_by_model(gens, drift["primary_test_prompt"])
    runs = runs_doc["runs"]
    drift_runs = {r["name"]: r for r in drift["runs"]}
    run_points = [
        {
            "name": r["name"],
            "condition": r["condition"],
            "align": r["mean_align_during_training"],
            "drift": drift_runs[r["name"]]["caps_shift"].get("value"),
            "projection_drift": drift_runs[r["name"]]["projection_shift_std_layer_mean"].get(
                "value"
            ),
        }
        for r in runs
    ]
    runs_of = {c: [r["name"] for r in runs if r["condition"] == c] for c in drift["by_condition"]}
    proj_shift = projection_shifts(DRIFT_DIR / "projections.npz", [r["name"] for r in runs])
    # Read every CAPS condition's drift against ordinary finetuning on normal-case targets.
    base_runs = runs_of.get(BASELINE_CONDITION, [])
    minus_baseline = {
        c: {
            "projection": run_difference(proj_shift, runs_of[c], base_runs, **boot),
            "caps": drift_difference(caps, runs_of[c], base_runs, **boot),
        }
        for c in runs_of
        if c != BASELINE_CONDITION
    }
    inoc_vs_neu_drift = drift_difference(
        caps, runs_of.get("inoculation", []), runs_of.get("neutral", []), **boot
    )
    held_ids = table["evaluation_ids"]
    criteria = {
        "c1_decrease": criterion_decrease(
            d_ino_neu, per_layer_paired(layer_align[ino], layer_align[neu], ids, layers, **boot)
        ),
        "c2_beyond_control": criterion_beyond_control(
            d_ino_ctl,
            table["chosen"],
            per_layer_paired(
                layer_align[ino][held], layer_align[ctl][held], held_ids, layers, **boot
            ),
        ),
        "c3_specific": criterion_specific(
            spec["neutral_to_inoculation"]["layer_mean"],
            spec["percentile_threshold"],
            spec["n_random"],
            spec["neutral_to_inoculation"]["nulls"],
        ),
        "c4_predicts_drift": criterion_predicts_drift(
            run_points,
            run_difference(
                proj_shift, runs_of.get("inoculation", []), runs_of.get("loss_matched", []), **boot
            ),
            drift_difference(
                caps, runs_of.get("inoculation", []), runs_of.get("loss_matched", []), **boot
            ),
            rc.ci,
        ),  # fmt: skip
    }
    label, line = verdict(criteria, d_loss)
    caveats = []
    if not sanity["separation_pass"]:
        caveats.append("the direction fails the held-out promote>suppress check at most layers")
    if not sanity["correlation_pass"]:
        caveats.append("the neutral-prompt projection does not predict caps in generated text")
    if not sanity["promote_produces_caps"]["pass"]:
        caveats.append("the promote prompt does not measurably raise caps in generated text")
    if not sanity["steering_raises_caps"]["pass"]:
        caveats.append("adding v_trait at the sanity layer does not measurably raise caps")
    if not table["chosen_ci_covers_zero"]:
        caveats.append(
            "the chosen control's loss differs from inoculation's (paired CI excludes 0)"
        )
    for key, what in (
        ("c1_decrease", "inoculation - neutral"),
        ("c2_beyond_control", "inoculation - control"),
    ):
        opp = criteria[key]["opposite_signed_layers"]
        if opp:
            caveats.append(
                f"{what} alignment has layers of the opposite sign to the layer mean "
                f"(CI excludes 0): {opp}"
            )
    if len(ids) < 16:
        caveats.append(f"only {len(ids)} calibration examples")

    by_pos = summary["inoculation_minus_neutral"]["align_layer_mean_by_position"]
    metrics = {
        "model": summary["model"],
        "verdict": label,
        "verdict_line": line,
        "caveats": caveats,
        "sign_convention": summary["sign_convention"],
        "criteria": criteria,
        "data": {
            "n_examples": stats["n_examples"],
            "n_calibration": len(ids),
            "n_eval_prompts": stats["n_eval_prompts"],
            "math_accuracy": stats["math"]["accuracy"],
            "caps_fraction_normal": stats["caps_fraction_normal_mean"],
            "caps_fraction_caps": stats["caps_fraction_caps_mean"],
        },
        "direction": {
            "layers": len(sanity["layers"]),
            "separation_layers_passing": sanity["separation_layers_passing"],
            "separation_pass": sanity["separation_pass"],
            "sanity_layer": sanity["sanity_layer"],
            "neutral_projection_vs_caps": sanity["neutral_correlation_at_sanity_layer"].get(
                "pearson"
            ),
            "correlation_pass": sanity["correlation_pass"],
            "promote_produces_caps": sanity["promote_produces_caps"],
            "promote_produces_caps_pass": sanity["promote_produces_caps"]["pass"],
            "steering_raises_caps": sanity["steering_raises_caps"],
            "steering_raises_caps_pass": sanity["steering_raises_caps"]["pass"],
        },
        "alignment": {
            "layers": summary["layers"],
            "neutral": float(align[neu].mean()),
            "inoculation": float(align[ino].mean()),
            "loss_matched": float(align[ctl].mean()),
            "inoculation_minus_neutral": d_ino_neu,
            "inoculation_minus_control": d_ino_ctl,
            "control_minus_neutral": d_ctl_neu,
            "robustness_positions": by_pos,
            "gate": summary["gate"],
            "precision": summary["precision"],
            "training_log_precision": runs_doc.get("precision"),
        },
        "loss": {
            "neutral": float(loss[neu].mean()),
            "inoculation": float(loss[ino].mean()),
            "loss_matched": float(loss[ctl].mean()),
            "inoculation_minus_neutral": d_loss,
            "control_minus_inoculation": d_loss_ctl,
        },
        "control": {
            "chosen": table["chosen"],
            "text": table["chosen_text"],
            "gap": table["chosen_gap"],
            "selection_gap": table["selection_gap"],
            "held_out_gap": table["held_out_gap"],
            "same_batch_choice": table["same_batch_choice"],
            "n_candidates": len(table["candidates"]),
        },
        "specificity": {
            "layer_mean_percentile": spec["neutral_to_inoculation"]["layer_mean"]["percentile"],
            "layers_specific": spec["neutral_to_inoculation"]["layers_specific"],
            "n_layers": len(spec["neutral_to_inoculation"]["per_layer"]),
            "control_layer_mean_percentile": spec["neutral_to_control"]["layer_mean"]["percentile"],
        },
        "drift": {
            "base_caps_mean": drift["base"]["caps_mean"],
            "by_condition": {
                c: {
                    "caps_shift": v["caps_shift"],
                    "projection_shift_std": v["projection_shift_std_layer_mean"],
                    **(
                        {
                            "projection_shift_minus_baseline": minus_baseline[c]["projection"],
                            "caps_shift_minus_baseline": minus_baseline[c]["caps"],
                        }
                        if c in minus_baseline
                        else {}
                    ),
                }
                for c, v in drift["by_condition"].items()
            },
            "inoculation_minus_neutral_caps": inoc_vs_neu_drift,
            "primary_test_prompt": drift["primary_test_prompt"],
            "sweep": drift["sweep"],
        },
        "runs": run_points,
        "seed_schedule": seed_schedule(
            run_points, criteria["c1_decrease"]["pass"], inoc_vs_neu_drift
        ),
    }
    # The GPU stages keep cached outs only (restorable from a pushed run-cache); their
    # git-tracked plots are drawn here, on the CPU, from those outs.
    for draw in (direction_plots, alignment_plots, finetune_plots, drift_plots):
        draw()
    write_results("inoculation", metrics)
    write_headline(METRICS, headline(metrics))
    scatter_plot(
        PLOTS_DIR / "training_alignment_vs_drift.png",
        [p["align"] for p in run_points],
        [np.nan if p["drift"] is None else p["drift"] for p in run_points],
        [p["name"] for p in run_points],
        title="Mean alignment during training vs caps drift",
        xlabel="mean cos(-g_l, v_l) during training",
        ylabel="caps-fraction shift (post - pre)",
    )
    write_series(PLOTS_DIR / "training_alignment_vs_drift.json", run_points)
    write_text(REPORT, render_report(metrics, summary, table, spec, drift))
    print(line)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _yes(flag: bool) -> str:
    return "PASS" if flag else "fail"


def render_report(
    m: dict[str, Any],
    summary: dict[str, Any],
    table: dict[str, Any],
    spec: dict[str, Any],
    drift: dict[str, Any],
) -> str:
    """Return the markdown report."""
    c = m["criteria"]
    lines = [
        f"# Inoculation: gradient alignment with an ALL-CAPS trait direction ({m['model']})",
        "",
        f"**Verdict: {m['verdict']}.** {m['verdict_line']}",
        "",
    ]
    if m["caveats"]:
        lines += ["Caveats: " + "; ".join(m["caveats"]) + ".", ""]
    lines += [
        "Alignment = cos(-g_l, v_l) at pre_assistant, mean over layers "
        f"{summary['layers']}; g_l = dL/dh_l on the ALL-CAPS target; positive = the update "
        "pushes the residual towards the trait. Intervals: 95% paired bootstrap over "
        f"{m['data']['n_calibration']} calibration examples.",
        "",
        "| criterion | figures | result |",
        "|---|---|---|",
        f"| 1. alignment decreases, inoculation vs neutral | {fmt_est(c['c1_decrease']['estimate'])} | {_yes(c['c1_decrease']['pass'])} |",
        f"| 2. more than loss-matched control ({c['c2_beyond_control']['control']}) | inoculation - control {fmt_est(c['c2_beyond_control']['estimate'])} | {_yes(c['c2_beyond_control']['pass'])} |",
        f"| 3. specific vs random ({c['c3_specific']['n_random']} per null) and other-trait directions | percentile by null {', '.join(f'{k} {v:.1f}' for k, v in c['c3_specific']['percentile_by_null'].items())} (trait delta {c['c3_specific']['trait_delta']:+.5f}); other traits {', '.join(f'{k} {v:+.5f}' for k, v in c['c3_specific']['other_trait_deltas'].items())} | {_yes(c['c3_specific']['pass'])} |",
        f"| 4. alignment predicts drift along v_trait (vs loss-matched) | {c['c4_predicts_drift']['basis']} | "
        f"{_yes(c['c4_predicts_drift']['pass']) if c['c4_predicts_drift']['evaluable'] else 'n/a'} |",
        "",
        "## Numbers",
        "",
        f"- Loss (CAPS target): neutral {m['loss']['neutral']:.3f}, inoculation {m['loss']['inoculation']:.3f}, "
        f"loss-matched {m['loss']['loss_matched']:.3f}; inoculation - neutral {fmt_est(m['loss']['inoculation_minus_neutral'], 3)}.",
        f"- Alignment: neutral {m['alignment']['neutral']:+.5f}, inoculation {m['alignment']['inoculation']:+.5f}, "
        f"loss-matched {m['alignment']['loss_matched']:+.5f}.",
        "- Robustness positions (inoculation - neutral, layer mean): "
        + "; ".join(f"{p} {fmt_est(e)}" for p, e in m["alignment"]["robustness_positions"].items())
        + ".",
        f"- Direction sanity: held-out promote > suppress at {m['direction']['separation_layers_passing']}/"
        f"{m['direction']['layers']} layers; neutral projection vs caps at layer {m['direction']['sanity_layer']}: "
        + (
            f"r = {m['direction']['neutral_projection_vs_caps']['r']:+.3f} "
            f"[{m['direction']['neutral_projection_vs_caps']['lo']:+.3f}, {m['direction']['neutral_projection_vs_caps']['hi']:+.3f}]"
            if m["direction"]["neutral_projection_vs_caps"]
            else "undefined"
        )
        + ".",
        f"- Promote prompt raises caps over neutral: {fmt_est(m['direction']['promote_produces_caps'], 3)} "
        f"({_yes(m['direction']['promote_produces_caps_pass'])}); v_trait added at layer "
        f"{m['direction']['steering_raises_caps'].get('layer')} raises caps: "
        f"{fmt_est(m['direction']['steering_raises_caps'], 3)} ({_yes(m['direction']['steering_raises_caps_pass'])}).",
        f"- Gradients computed in {m['alignment']['precision']['dtype']} on "
        f"{m['alignment']['precision']['device']}; the training-time alignment log in "
        f"{(m['alignment']['training_log_precision'] or {}).get('dtype', 'n/a')}.",
        f"- Phase-3 gate: split-half reliability of the neutral alignment profile r = "
        f"{_num(m['alignment']['gate']['neutral_split_half_reliability'].get('r'))}, loss shift "
        f"measurable: {m['alignment']['gate']['loss_shift_measurable']}, stable across halves: "
        f"{m['alignment']['gate']['loss_shift_stable']}; failing: "
        f"{', '.join(m['alignment']['gate']['failed']) or 'none'}"
        f"{' (overridden)' if m['alignment']['gate']['failed'] else ''}.",
        f"- Drift (test prompt {drift['primary_test_prompt']}, {drift['n_prompts']} held-out prompts, base caps fraction "
        f"{_num(m['drift']['base_caps_mean'])}): "
        + "; ".join(
            f"{cond} caps shift {fmt_est(v['caps_shift'], 3)}, projection shift "
            f"{fmt_est(v['projection_shift_std'], 3)} SD"
            for cond, v in m["drift"]["by_condition"].items()
        )
        + f"; inoculation - neutral caps drift {fmt_est(m['drift']['inoculation_minus_neutral_caps'], 3)}.",
        "- Test-time system prompt sweep (caps shift by condition): "
        + "; ".join(
            f"{tp}: "
            + ", ".join(f"{c} {fmt_est(v['caps_shift'], 3)}" for c, v in sw["by_condition"].items())
            for tp, sw in m["drift"]["sweep"].items()
        )
        + ".",
        "- Projection shift minus the normal-completion finetune (ordinary finetuning drift): "
        + (
            "; ".join(
                f"{cond} {fmt_est(v.get('projection_shift_minus_baseline'), 3)} SD"
                for cond, v in m["drift"]["by_condition"].items()
                if "projection_shift_minus_baseline" in v
            )
            or "no baseline run (finetune.baseline_normal: false)"
        )
        + ".",
        "- Criteria 1-2 per layer (paired 95% CI excludes 0): inoculation - neutral below 0 at "
        f"{c['c1_decrease']['layers_below_zero']}, above 0 at {c['c1_decrease']['layers_above_zero']}; "
        f"inoculation - control below 0 at {c['c2_beyond_control']['layers_below_zero']}, above 0 at "
        f"{c['c2_beyond_control']['layers_above_zero']}.",
        "- Criterion 4 correlation over runs (alignment vs projection shift), cluster-aware: "
        f"within-condition r = {_num(c['c4_predicts_drift']['correlation']['within'].get('r'))} "
        f"({c['c4_predicts_drift']['correlation']['within']['dof']} dof), conditions ordered alike: "
        f"{c['c4_predicts_drift']['same_order']}; caps companion inoculation - control "
        f"{fmt_est(c['c4_predicts_drift']['caps_inoculation_minus_control'], 3)}.",
        f"- Seeds: {m['seed_schedule']['line']}.",
        "- Runs (mean training alignment -> caps shift): "
        + "; ".join(f"{p['name']} {p['align']:+.4f} -> {_num(p['drift'])}" for p in m["runs"])
        + ".",
        "",
        "## Loss-matched control selection",
        "",
        f"Inoculation loss {table['target_loss']:.4f}; candidates by distance:",
        "",
        "| candidate | text | mean loss | gap |",
        "|---|---|---|---|",
    ]
    for row in table["candidates"]:
        lines.append(
            f"| {row['name']} | {row['text']} | {row['mean_loss']:.4f} | {row['abs_gap']:.4f} |"
        )
    lines += [
        "",
        f'Chosen: **{table["chosen"]}** ("{table["chosen_text"]}") on '
        f"{len(table['selection_ids'])} examples (gap {table['selection_gap']:.4f}); gap on the "
        f"{len(table['evaluation_ids'])} held-out examples {table['held_out_gap']:.4f}, where "
        f"criterion 2 is measured. Same-batch choice: {table['same_batch_choice']}.",
        "",
        "## Prompts and positions",
        "",
    ]
    for cond in summary["conditions"]:
        if cond["role"] != "control":
            text = cond["text"]
            lines.append(
                f'- {cond["name"]}: "{text}"'
                if text is not None
                else f"- {cond['name']}: no system message (the chat template's default)"
            )
    lines += [
        "- Positions: user_end = last token of the user content; pre_assistant = token right before "
        "the assistant content (canonical); assistant_k = k-th assistant token (teacher forcing).",
        "",
        "## Plots",
        "",
        "plots/inoculation/: direction_projections.png, projection_vs_caps.png, alignment_by_layer.png, "
        "loss_by_condition.png, specificity.png, training_alignment.png, projection_shift_by_layer.png, "
        "caps_shift_by_condition.png, training_alignment_vs_drift.png",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    run_stage(main)
