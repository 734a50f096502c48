"""Stage introspection_report: results, the headline metrics, plots and the markdown report.

Collects every model's evaluation summary and every variant's training curve, computes the
comparisons across models (P(yes) shift and KL against the base model, paired by question or
prompt), and evaluates the plan's "what success looks like" list from the numbers.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.headline import estimate, get, write_headline
from llmlab.introspection.config import VARIANT_NAMES
from llmlab.introspection.judging import judge_counts_by_model, low_coverage
from llmlab.introspection.success import success_list
from llmlab.io import read_json, read_jsonl, write_json, write_text
from llmlab.plots import bar_with_ci, line_plot, write_series
from llmlab.stats import D_PRIME_CLIP_RULE, bootstrap_diff, proportion_ci

MODELS = ("base", *VARIANT_NAMES)
B1_SETS = ("in_distribution", "heldout", "concept")


def _est(d: dict[str, Any] | None) -> tuple[float, float, float]:
    if not d:
        return (math.nan, math.nan, math.nan)
    return (d["value"], d["lo"], d["hi"])


def training_summary(adapters: Path) -> dict[str, Any]:
    """Return per variant: steps, losses, start/end validation accuracy (Wilson CI at the end)."""
    out: dict[str, Any] = {}
    for v in VARIANT_NAMES:
        meta = read_json(adapters / v / "llmlab_adapter.json")
        curve = read_json(adapters / v / "curve.json")
        evals = [r for r in curve if "val_accuracy" in r]
        losses = [r["loss"] for r in curve if r.get("loss") is not None]
        n_val = int(meta.get("n_val_rows") or 0)
        selected = meta.get("selected_checkpoint")
        # The adapter evaluated is the selected checkpoint's when one was selected.
        end = (
            next((r for r in evals if r["step"] == selected["step"]), {})
            if selected
            else (evals[-1] if evals else {})
        )
        acc_end = end.get("val_accuracy")
        out[v] = {
            "rank": meta["config"]["rank"],
            "alpha": meta["config"]["alpha"],
            "steps": meta["steps"],
            "n_train": meta["n_examples"],
            "n_val": n_val,
            "first_train_loss": losses[0] if losses else None,
            "final_train_loss": meta["final_train_loss"],
            "val_accuracy_start": evals[0].get("val_accuracy") if evals else None,
            "val_accuracy_end": (
                proportion_ci(round(acc_end * n_val), n_val).to_dict()
                if acc_end is not None and n_val
                else None
            ),
            "val_accuracy_true_labels_end": end.get("val_accuracy_true_labels"),
            "val_label_nll_start": evals[0].get("val_label_nll") if evals else None,
            "val_label_nll_end": end.get("val_label_nll"),
            "train_time_s": meta.get("train_time_s"),
            "wall_time_s": meta.get("wall_time_s"),
            "selected_step": selected["step"] if selected else None,
            "imported_from": meta.get("imported_from"),
        }
    return out


def write_training_series(adapters: Path, out: Path) -> dict[str, list[dict[str, Any]]]:
    """Write plots/introspection/train_<variant>.json from each adapter's curve; return the curves.

    Written here, by the CPU-only report, not by the training stage: that stage then has only
    cached outs, which DVC can restore from a pushed run-cache on another machine.
    """
    curves = {v: read_json(adapters / v / "curve.json") for v in VARIANT_NAMES}
    for v, c in curves.items():
        write_series(out / f"train_{v}.json", curve_rows(c, v))
    return curves


def curve_rows(curve: list[dict[str, Any]], variant: str) -> list[dict[str, Any]]:
    """Return flat plot rows of a training curve, tagged with the variant (trained steps only)."""
    keys = (
        "step",
        "loss",
        "val_accuracy",
        "val_accuracy_true_labels",
        "val_label_nll",
        "val_p_yes",
    )
    return [
        {"variant": variant, **{k: row.get(k) for k in keys}}
        for row in curve
        if row.get("step") is not None
    ]


YES_NO_WORDS = frozenset({"yes", "no"})


def _words(text: str) -> list[str]:
    """Return the lower-case alphabetic words of a text, splitting glued "yesyesno" runs."""
    import re

    out: list[str] = []
    for word in re.findall(r"[a-z]+", text.lower()):
        if re.fullmatch(r"(?:yes|no)+", word):
            out.extend(re.findall(r"yes|no", word))
        else:
            out.append(word)
    return out


def yes_no_intrusion(eval_dir: Path, model: str) -> dict[str, Any]:
    """Return how often a model's open-ended B3 answers start with, or are only, yes/no words.

    A one-token yes/no finetune can leak its answer format into every reply ("Who are you?"
    -> "yes yes no ..."): these shares, next to the base model's, tell a changed identity
    from a collapsed output format when the B3-B7 numbers are read.
    """
    rows = read_jsonl(eval_dir / model / "b3_identity.jsonl")
    answers = [_words(r.get("answer") or "") for r in rows]
    n = len(answers)
    starts = sum(1 for w in answers if w and w[0] in YES_NO_WORDS)
    only = sum(1 for w in answers if w and all(x in YES_NO_WORDS for x in w))
    return {
        "n": n,
        "starts_yes_no": proportion_ci(starts, n).to_dict() if n else None,
        "only_yes_no": proportion_ci(only, n).to_dict() if n else None,
        "rule": "words are lower-case letter runs with 'yes'/'no' split out of glued runs; "
        "an answer starts with yes/no if its first word is one, and is only yes/no if every "
        "word is",
    }


def reply_diversity(eval_dir: Path, model: str) -> dict[str, Any]:
    """Return how varied a model's open-ended B3 answers are: distinct answers and distinct-2.

    distinct-2 (Li et al. 2016) is the share of word bigrams that are unique across all the
    model's answers; an adapter that collapses onto a few replies ("yes yes yes", the same
    sentence for every question) drives it towards 0 while the base model's stays high.
    """
    rows = read_jsonl(eval_dir / model / "b3_identity.jsonl")
    answers = [" ".join(_words(r.get("answer") or "")) for r in rows]
    bigrams = [
        (a, b) for text in answers for a, b in zip(text.split(), text.split()[1:], strict=False)
    ]
    return {
        "n": len(answers),
        "distinct_answers": len(set(answers)) / len(answers) if answers else None,
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else None,
    }


def collapse_check(
    eval_dir: Path, leak: dict[str, dict[str, Any]], max_leak_rate: float, min_vs_base: float
) -> dict[str, Any]:
    """Return per model whether its free-text answers collapsed, against the base model.

    A model is collapsed when its share of B3 answers made only of yes/no words is above
    max_leak_rate, or its distinct-2 is below min_vs_base times the base model's.
    """
    div = {m: reply_diversity(eval_dir, m) for m in MODELS}
    base = div["base"]["distinct_2"]
    out: dict[str, Any] = {
        "rule": f"collapsed: only-yes/no share > {max_leak_rate:g} (max_leak_rate), or "
        f"distinct-2 of the B3 answers < {min_vs_base:g} x the base model's "
        "(min_distinct_vs_base)",
        "models": {},
    }
    for m in MODELS:
        only = (leak[m].get("only_yes_no") or {}).get("value")
        d2 = div[m]["distinct_2"]
        ratio = d2 / base if d2 is not None and base else None
        reasons = []
        if only is not None and only > max_leak_rate:
            reasons.append(f"{only:.2f} of answers only yes/no")
        if m != "base" and (ratio is None or ratio < min_vs_base):
            reasons.append(
                "no word pairs to compare" if ratio is None else f"distinct-2 {ratio:.2f} x base"
            )
        out["models"][m] = {
            **div[m],
            "only_yes_no": only,
            "distinct_2_vs_base": ratio,
            "collapsed": bool(reasons),
            "reasons": reasons,
        }
    return out


def p_yes_by_question(eval_dir: Path, model: str) -> dict[str, dict[str, Any]]:
    """Return {question id: B2 record} of a model."""
    return {r["id"]: r for r in read_jsonl(eval_dir / model / "b2_logprobs.jsonl", id_field="id")}


def p_yes_shift(a: dict, b: dict, self_ref: bool, seed: int, key: str = "p_yes") -> dict[str, Any]:
    """Return mean P(yes)(a) - P(yes)(b), paired by question, on self-referential or control
    questions; key: "p_yes" (renormalised over yes + no) or "p_yes_absolute"."""
    keys = [k for k in a if a[k]["control"] is not self_ref and k in b]
    return bootstrap_diff(
        {k: [a[k][key]] for k in keys}, {k: [b[k][key]] for k in keys}, seed=seed
    ).to_dict()


def category_shift(a: dict, b: dict, key: str) -> dict[str, float]:
    """Return the mean P(yes) shift a - b per question category (paired by question)."""
    diffs: dict[str, list[float]] = {}
    for k, r in a.items():
        if k in b:
            diffs.setdefault(r["category"], []).append(r[key] - b[k][key])
    return {c: float(np.mean(v)) for c, v in sorted(diffs.items())}


def kl_diff(eval_dir: Path, model: str, ref: str, seed: int) -> dict[str, Any] | None:
    """Return mean KL(model) - KL(ref) paired over prompts (None if fewer than 3 shared).

    Unparseable reports are in, scored as failures (see calibration.py).
    """
    a = {r["id"]: r["kl"] for r in read_jsonl(eval_dir / model / "b5_calibration.jsonl")}
    b = {r["id"]: r["kl"] for r in read_jsonl(eval_dir / ref / "b5_calibration.jsonl")}
    keys = [k for k in a if k in b]
    if len(keys) < 3:
        return None
    return bootstrap_diff({k: [a[k]] for k in keys}, {k: [b[k]] for k in keys}, seed=seed).to_dict()


def collect(eval_dir: Path, adapters: Path, seed: int = 0) -> dict[str, Any]:
    """Return the metrics tree of the family."""
    summaries = {m: read_json(eval_dir / m / "summary.json") for m in MODELS}
    ev = {m: s["evaluations"] for m, s in summaries.items()}
    b1 = {
        m: {
            s: {k: ev[m][f"b1_{s}"][k] for k in ("accuracy", "tpr", "fpr", "d_prime", "n")}
            for s in B1_SETS
        }
        for m in MODELS
        if "b1_in_distribution" in ev[m]
    }
    py = {m: p_yes_by_question(eval_dir, m) for m in MODELS}
    b2: dict[str, Any] = {}
    for m in MODELS:
        s = ev[m]["b2_logprobs"]
        b2[m] = {
            "self_referential_p_yes": s["self_referential_p_yes"],
            "control_p_yes": s["control_p_yes"],
            "self_referential_p_yes_absolute": s["self_referential_p_yes_absolute"],
            "control_p_yes_absolute": s["control_p_yes_absolute"],
            "control_accuracy": s["control_accuracy"],
        }
        if m != "base":
            b2[m]["self_shift_vs_base"] = p_yes_shift(py[m], py["base"], True, seed)
            b2[m]["control_shift_vs_base"] = p_yes_shift(py[m], py["base"], False, seed)
            for ref in (True, False):
                name = "self" if ref else "control"
                b2[m][f"{name}_shift_absolute_vs_base"] = p_yes_shift(
                    py[m], py["base"], ref, seed, "p_yes_absolute"
                )
            b2[m]["category_shift_vs_base"] = category_shift(py[m], py["base"], "p_yes")
            b2[m]["category_shift_absolute_vs_base"] = category_shift(
                py[m], py["base"], "p_yes_absolute"
            )
    b2["key_comparisons"] = {
        "vague_minus_original_self": p_yes_shift(py["vague"], py["original"], True, seed),
        "food_control_minus_original_self": p_yes_shift(
            py["food_control"], py["original"], True, seed
        ),
    }
    b5 = {m: dict(ev[m]["b5_calibration"]) for m in MODELS}
    for m in VARIANT_NAMES:
        b5[m]["kl_minus_base"] = kl_diff(eval_dir, m, "base", seed)
    phase_c_path = eval_dir / "phase_c" / "summary.json"
    judge_counts = judge_counts_by_model(ev)
    min_share = {m: summaries[m]["judge"]["min_judged_share"] for m in MODELS}
    return {
        "d_prime_rule": D_PRIME_CLIP_RULE,
        "training": training_summary(adapters),
        "b1_detection": b1,
        "food_task_accuracy": {m: ev[m]["food_task"]["accuracy"] for m in MODELS},
        "b2_p_yes": b2,
        "b3_identity": {m: ev[m]["b3_identity"] for m in MODELS},
        "b3_yes_no_intrusion": {m: yes_no_intrusion(eval_dir, m) for m in MODELS},
        "b4_selfpred": {
            m: {
                k: ev[m]["b4_selfpred"][k]
                for k in (
                    "n_tasks",
                    "n_applicable",
                    "n_valid",
                    "n_beating_baseline",
                    "mean_accuracy_minus_baseline",
                )
            }
            for m in MODELS
        },
        "b5_calibration": b5,
        "b6_concepts": {m: ev[m]["b6_concepts"] for m in MODELS if "b6_concepts" in ev[m]},
        "b7_localization": {
            m: ev[m]["b7_localization"] for m in MODELS if "b7_localization" in ev[m]
        },
        "phase_c": read_json(phase_c_path) if phase_c_path.is_file() else None,
        "eval_seconds": {m: summaries[m].get("wall_s") for m in MODELS},
        "judge": {m: summaries[m].get("judge") for m in MODELS},
        "judge_counts": judge_counts,
        "judge_low_coverage": low_coverage(judge_counts, min_share),
    }


def selfpred_rows(eval_dir: Path) -> list[dict[str, Any]]:
    """Return flat per-(model, task) self-prediction rows for the plot data."""
    rows = []
    for m in MODELS:
        tasks = read_json(eval_dir / m / "summary.json")["evaluations"]["b4_selfpred"]["tasks"]
        for t, r in tasks.items():
            if r.get("applicable"):
                rows.append(
                    {
                        "model": m,
                        "task": t,
                        "accuracy": r["accuracy"]["value"],
                        "mode_baseline": r["mode_baseline"],
                        "n": r["n"],
                        "compliance": r["compliance"],
                    }
                )
    return rows


def _bounds(d: dict[str, Any] | None) -> dict[str, Any]:
    d = d or {}
    return {"lo": d.get("lo"), "hi": d.get("hi")}


def category_series(metrics: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Return the rows of the categorical series drawn by `.dvc/plots/grouped_bars_ci.json`.

    Every row has the category (the plot's y), `group` (the colour within a category), the
    interval `lo`/`hi` of its value (null where the stage has none) and, where the value is
    missing, a `note` that the plot writes in its place.
    """
    b1, b2, b5 = metrics["b1_detection"], metrics["b2_p_yes"], metrics["b5_calibration"]
    detection = [
        {
            "model": m,
            "group": s,
            "set": s,
            "accuracy": b1[m][s]["accuracy"]["value"],
            **_bounds(b1[m][s]["accuracy"]),
            "tpr": b1[m][s]["tpr"]["value"],
            "fpr": b1[m][s]["fpr"]["value"],
            "d_prime": b1[m][s]["d_prime"]["d_prime"],
        }
        for m in b1
        for s in B1_SETS
    ]
    shift = [
        {
            "variant": v,
            "group": group,
            "shift": (b2[v][key] or {}).get("value"),
            **_bounds(b2[v][key]),
        }
        for v in VARIANT_NAMES
        for group, key in (
            ("self-referential", "self_shift_vs_base"),
            ("control", "control_shift_vs_base"),
        )
    ]
    kl = [
        {
            "model": m,
            "group": m,
            "kl": (b5[m]["kl"] or {}).get("value"),
            **_bounds(b5[m]["kl"]),
            "n_parsed": b5[m]["n_parsed"],
            "n_unparseable": b5[m]["n_unparseable"],
            # Drawn where the bar would be, so a model without a KL is labelled, not missing.
            "note": None
            if (b5[m]["kl"] or {}).get("value") is not None
            else f"n/a: {b5[m]['n_parsed']} of "
            f"{b5[m]['n_parsed'] + b5[m]['n_unparseable']} reports parsed",
        }
        for m in MODELS
    ]
    return {"detection": detection, "p_yes_shift": shift, "kl": kl}


def write_plots(metrics: dict[str, Any], eval_dir: Path, adapters: Path, out: Path) -> None:
    """Write the PNGs and the JSON series of the report."""
    b1 = metrics["b1_detection"]
    models = list(b1)
    bar_with_ci(
        out / "detection.png",
        models,
        {s: [_est(b1[m][s]["accuracy"]) for m in models] for s in B1_SETS},
        "B1 detection accuracy by vector set (95% Wilson CI)",
        "accuracy",
        ylim=(0, 1),
        xlabel="model",
    )
    series = category_series(metrics)
    write_series(out / "detection.json", series["detection"])
    b2 = metrics["b2_p_yes"]
    variants = list(VARIANT_NAMES)
    bar_with_ci(
        out / "p_yes_shift.png",
        variants,
        {
            "self-referential": [_est(b2[v]["self_shift_vs_base"]) for v in variants],
            "control": [_est(b2[v]["control_shift_vs_base"]) for v in variants],
        },
        "B2 P(yes) shift against the base model (95% bootstrap CI)",
        "P(yes) minus base",
        xlabel="variant",
    )
    write_series(out / "p_yes_shift.json", series["p_yes_shift"])
    sp = selfpred_rows(eval_dir)
    write_series(out / "selfpred.json", sp)
    means = {m: [r for r in sp if r["model"] == m] for m in MODELS}
    bar_with_ci(
        out / "selfpred.png",
        list(MODELS),
        {
            "accuracy": [_mean3([r["accuracy"] for r in means[m]]) for m in MODELS],
            "mode baseline": [_mean3([r["mode_baseline"] for r in means[m]]) for m in MODELS],
        },
        "B4 self-prediction: mean over applicable tasks",
        "accuracy",
        ylim=(0, 1),
        xlabel="model",
    )
    b5 = metrics["b5_calibration"]
    bar_with_ci(
        out / "kl.png",
        list(MODELS),
        {"KL(P_actual || P_reported)": [_est(b5[m]["kl"]) for m in MODELS]},
        "B5 self-calibration (lower is better; parsed prompts only)",
        "KL (nats)",
        xlabel="model",
    )
    write_series(out / "kl.json", series["kl"])
    curves = write_training_series(adapters, out)
    # An imported adapter's one evaluation has no step (step None): it has no curve to draw.
    steps = sorted(
        {
            r["step"]
            for c in curves.values()
            for r in c
            if "val_accuracy" in r and r["step"] is not None
        }
    )
    accuracy = {}
    for v, c in curves.items():
        by_step = {r["step"]: r.get("val_accuracy") for r in c if "val_accuracy" in r}
        accuracy[v] = [by_step.get(s, math.nan) for s in steps]
    line_plot(
        out / "val_accuracy.png",
        steps,
        accuracy,
        "Validation accuracy during training (own labels)",
        "optimizer step",
        "validation accuracy",
        hline=0.5,
    )


def _mean3(values: list[float]) -> tuple[float, float, float]:
    m = sum(values) / len(values) if values else math.nan
    return (m, m, m)


def headline(m: dict[str, Any]) -> dict[str, Any]:
    """Return the numbers compared across runs (the rest stays in the results file).

    Model 0 (original) carries the intervals; the other variants and the base model show the
    value that their success criterion compares against it.
    """
    b1 = "b1_detection.{}.{}.accuracy"
    return {
        "b1_original_in_distribution": estimate(get(m, b1.format("original", "in_distribution"))),
        "b1_original_heldout": estimate(get(m, b1.format("original", "heldout"))),
        "b1_original_heldout_d_prime": get(m, "b1_detection.original.heldout.d_prime.d_prime"),
        "b1_in_distribution": {
            model: get(m, b1.format(model, "in_distribution") + ".value")
            for model in ("base", "vague", "r1_minimal")
        },
        "b2_self_shift_vs_base": {
            model: estimate(get(m, f"b2_p_yes.{model}.self_shift_vs_base"))
            for model in ("original", "food_control")
        },
        "b2_vague_minus_original_self": estimate(
            get(m, "b2_p_yes.key_comparisons.vague_minus_original_self")
        ),
        "b3_identity_confusion": {
            model: get(m, f"b3_identity.{model}.identity_confusion_rate.value")
            for model in ("base", "original")
        },
        "b4_selfpred_minus_baseline": get(m, "b4_selfpred.original.mean_accuracy_minus_baseline"),
        "b5_kl_minus_base": get(m, "b5_calibration.original.kl_minus_base.value"),
        "val_accuracy_end": {
            v: get(m, f"training.{v}.val_accuracy_end.value")
            for v in ("original", "flipped_labels")
        },
        "food_control_task_accuracy": get(m, "food_task_accuracy.food_control.value"),
        "success_met": sum(s["met"] is True for s in m["success"]),
        "success_assessable": sum(s["met"] is not None for s in m["success"]),
        # B3/B6 rates resting on fewer than judge.min_judged_share of their items (0: none)
        "judge_low_coverage_rates": (
            len(m["judge_low_coverage"]) if "judge_low_coverage" in m else None
        ),
    }


def main() -> None:
    from llmlab.introspection.markdown import render_report
    from llmlab.params import load_params

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--eval-dir", default="data/introspection/eval")
    ap.add_argument("--adapters", default="models/introspection")
    ap.add_argument("--datasets", default="data/introspection/datasets")
    ap.add_argument("--metrics", default="metrics/introspection.json")
    ap.add_argument("--results", default="data/introspection/results.json")
    ap.add_argument("--report", default="metrics/introspection_report.md")
    ap.add_argument("--plots", default="plots/introspection")
    args = ap.parse_args()
    eval_dir, adapters = Path(args.eval_dir), Path(args.adapters)
    metrics = collect(eval_dir, adapters)
    metrics["datasets"] = read_json(Path(args.datasets) / "summary.json")["variants"]
    params = load_params(args.params, family="introspection")
    cfg = params.section("introspection")
    metrics["model"] = params.model
    metrics["success"] = success_list(metrics, cfg.max_leak_rate)
    metrics["max_leak_rate"] = cfg.max_leak_rate
    metrics["collapse"] = collapse_check(
        eval_dir, metrics["b3_yes_no_intrusion"], cfg.max_leak_rate, cfg.min_distinct_vs_base
    )
    write_plots(metrics, eval_dir, adapters, Path(args.plots))
    write_json(args.results, metrics)
    write_headline(args.metrics, headline(metrics))
    write_text(args.report, render_report(metrics))


if __name__ == "__main__":
    from llmlab.stage import run_stage

    run_stage(main, gpus=0)
