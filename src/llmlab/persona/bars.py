"""The plan's success bars and stop-early criteria, evaluated to booleans with their inputs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from llmlab.persona.config import Bars, ReportParams
from llmlab.persona.metrics import simple_rate


class StoppedEarly(RuntimeError):
    """The plan's stop-early criteria tripped on a first sample, before the whole grid."""


MEASURE_KEYS = {
    "judge": ("triggered_persona", "untriggered_leakage", "gap"),
    "keyword": ("keyword_triggered", "keyword_leakage", "keyword_gap"),
}


def _meets(cell: Mapping[str, Any], keys: tuple[str, str, str], bar: Bars, use_ci: bool) -> bool:
    """Return whether one cell clears the bar (point estimates, or the CI's far side)."""
    trig, leak, gap = (cell[k] for k in keys)
    if any(x["value"] is None for x in (trig, leak, gap)):
        return False
    t = trig["lo"] if use_ci else trig["value"]
    lk = leak["hi"] if use_ci else leak["value"]
    g = gap["lo"] if use_ci else gap["value"]
    return t > bar.triggered_min and lk < bar.leakage_max and g > bar.gap_min


def evaluate_bar(
    bar: Bars, pooled: Mapping[str, Any], by_condition: Mapping[str, Any], measure: str
) -> dict[str, Any]:
    """Return the bar's booleans: on point estimates (`met`) and on the CIs (`met_ci`)."""
    keys = MEASURE_KEYS[measure]
    cells = [pooled, *by_condition.values()] if bar.all_conditions else [pooled]
    rule = (
        f"{keys[0]} > {bar.triggered_min}, {keys[1]} < {bar.leakage_max}, {keys[2]} > "
        f"{bar.gap_min}, " + ("pooled and in every system-prompt condition" if bar.all_conditions
                             else "pooled over system-prompt conditions")
    )  # fmt: skip
    trig, leak, gap = (pooled[k]["value"] for k in keys)
    return {
        "met": all(_meets(c, keys, bar, use_ci=False) for c in cells),
        "met_ci": all(_meets(c, keys, bar, use_ci=True) for c in cells),
        "triggered_ok": trig is not None and trig > bar.triggered_min,
        "leakage_ok": leak is not None and leak < bar.leakage_max,
        "gap_ok": gap is not None and gap > bar.gap_min,
        "measure": measure,
        "rule": rule + "; met_ci uses the CI bound on the far side of each threshold",
    }


def _loss_status(curve: Sequence[Mapping[str, Any]], max_ratio: float) -> dict[str, Any]:
    losses = [r.get("loss") for r in curve if "loss" in r]
    finite = [x for x in losses if x is not None and math.isfinite(x)]
    nan = len(finite) != len(losses)
    first, last = (finite[0], finite[-1]) if finite else (None, None)
    ratio = (last / first) if finite and first else None
    return {
        "loss_nan": nan,
        "loss_first": first,
        "loss_last": last,
        "loss_last_over_first": round(ratio, 4) if ratio is not None else None,
        "loss_diverging": ratio is not None and ratio > max_ratio,
    }


def reply_checks(rows: Sequence[Mapping[str, Any]], cfg: ReportParams) -> dict[str, Any]:
    """Return the reply-level stop criteria: triggered format violations of the finetuned
    model, and collapse (empty or refusing replies) measured against the base model: a rate
    counts as collapse when it exceeds the base model's by more than max_collapse, since an
    instruct model refuses some persona questions before any finetune."""
    out: dict[str, Any] = {}
    fmt = simple_rate(rows, "format_ok", model="finetuned", triggered=True)
    violation = None if fmt is None else 1.0 - fmt
    out["format_violation_triggered"] = violation
    out["format_violation_flag"] = violation is not None and violation > cfg.max_format_violation
    excess = []
    for name in ("empty", "refusal"):
        for trig in (True, False):
            key = f"{name}_rate_{'triggered' if trig else 'untriggered'}"
            out[key] = ft = simple_rate(rows, name, model="finetuned", triggered=trig)
            out[f"{key}_base"] = base = simple_rate(rows, name, model="base", triggered=trig)
            if ft is not None:
                excess.append(ft - (base or 0.0))
    out["collapse_over_base"] = round(max(excess), 4) if excess else None
    out["collapse_flag"] = any(v > cfg.max_collapse for v in excess)
    return out


def stop_reasons(out: Mapping[str, Any]) -> list[str]:
    """Return the tripped criteria of a stop-early result, in words."""
    return [
        label
        for label, flag in (
            ("triggered replies often break the <START> ... <END> format", out["format_violation_flag"]),
            ("training loss is NaN", out.get("loss_nan")),
            ("training loss is diverging", out.get("loss_diverging")),
            ("replies collapse to empty answers or refusals (beyond the base model's rate)",
             out["collapse_flag"]),
        )
        if flag
    ]  # fmt: skip


def stop_early(
    rows: Sequence[Mapping[str, Any]], curve: Sequence[Mapping[str, Any]], cfg: ReportParams
) -> dict[str, Any]:
    """Return the plan's stop-early criteria for the finetuned model, each with a flag."""
    out: dict[str, Any] = _loss_status(curve, cfg.max_loss_ratio)
    out.update(reply_checks(rows, cfg))
    reasons = stop_reasons(out)
    out["stop"] = bool(reasons)
    out["reasons"] = reasons
    out["thresholds"] = {
        "max_format_violation": cfg.max_format_violation,
        "max_collapse": cfg.max_collapse,
        "max_loss_ratio": cfg.max_loss_ratio,
    }
    return out
