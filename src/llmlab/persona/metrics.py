"""Rates with hierarchical bootstrap CIs (questions, then samples) over judged replies."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llmlab.judge.judge import FAILED_STATUSES
from llmlab.stats import Estimate, bootstrap_diff, hierarchical_bootstrap

ALL = "all"
# Row field of each measure: a 1/0 value per reply, None when it could not be scored.
MEASURES = {
    "judge": "judge_persona",
    "keyword": "keyword_persona",
    "format": "format_ok",
    "as_ai": "judge_as_ai",
    "as_ai_rule": "as_ai_rule",
    "empty": "empty",
    "refusal": "refusal",
}


@dataclass(frozen=True)
class Boot:
    """Bootstrap settings."""

    n_boot: int = 2000
    ci: float = 0.95
    seed: int = 0


def _value(row: dict[str, Any], field: str) -> float:
    v = row.get(field)
    return math.nan if v is None else float(v)


def grouped(
    rows: Iterable[dict[str, Any]],
    field: str,
    *,
    model: str,
    triggered: bool,
    condition: str = ALL,
    question_set: str | None = None,
) -> dict[str, list[float]]:
    """Return {question id: values} of one field over the rows of one cell (NaN = unscorable)."""
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["model"] != model or bool(r["triggered"]) != triggered:
            continue
        if condition != ALL and r["condition"] != condition:
            continue
        if question_set is not None and r["question_set"] != question_set:
            continue
        out.setdefault(r["question_id"], []).append(_value(r, field))
    return out


def as_dict(est: Estimate | None) -> dict[str, Any]:
    """Return value and interval rounded for the metrics file (nulls when not estimable)."""
    if est is None:
        return {"value": None, "lo": None, "hi": None}
    return {"value": round(est.value, 4), "lo": round(est.lo, 4), "hi": round(est.hi, 4)}


def rate(groups: dict[str, list[float]], boot: Boot) -> Estimate | None:
    """Return the pooled rate with its interval; None when nothing in the cell was scorable."""
    if not groups or all(math.isnan(v) for vals in groups.values() for v in vals):
        return None
    return hierarchical_bootstrap(groups, n_boot=boot.n_boot, ci=boot.ci, seed=boot.seed)


def gap(on: dict[str, list[float]], off: dict[str, list[float]], boot: Boot) -> Estimate | None:
    """Return triggered minus untriggered, paired by question; None when not estimable."""
    if not on or set(on) != set(off):
        return None
    try:
        return bootstrap_diff(on, off, paired=True, n_boot=boot.n_boot, ci=boot.ci, seed=boot.seed)
    except ValueError:  # no question scorable on both sides
        return None


def n_unscorable(groups: dict[str, list[float]]) -> int:
    """Return how many replies in a cell could not be scored."""
    return sum(math.isnan(v) for vals in groups.values() for v in vals)


def judged_share(groups: dict[str, list[float]]) -> float | None:
    """Return the share of a cell's planned replies that carry a verdict (None: empty cell)."""
    n = sum(len(vals) for vals in groups.values())
    return round(1 - n_unscorable(groups) / n, 4) if n else None


def n_judge_failed(
    rows: Iterable[dict[str, Any]], *, model: str, condition: str, question_set: str | None
) -> int:
    """Return how many replies of one cell the judge never answered (told apart by status)."""
    status = f"{MEASURES['judge']}_status"
    return sum(
        r.get(status) in FAILED_STATUSES
        for r in rows
        if r["model"] == model
        and (condition == ALL or r["condition"] == condition)
        and (question_set is None or r["question_set"] == question_set)
    )


def cell_metrics(
    rows: Sequence[dict[str, Any]],
    *,
    model: str,
    condition: str,
    question_set: str | None,
    boot: Boot,
    with_as_ai: bool = True,
) -> dict[str, Any]:
    """Return every rate of one (model, condition, question set) with CIs and sample sizes."""

    def cells(field: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        kw = dict(model=model, condition=condition, question_set=question_set)
        return grouped(rows, field, triggered=True, **kw), grouped(
            rows, field, triggered=False, **kw
        )

    judge_on, judge_off = cells(MEASURES["judge"])
    kw_on, kw_off = cells(MEASURES["keyword"])
    fmt_on, fmt_off = cells(MEASURES["format"])
    out: dict[str, Any] = {
        "triggered_persona": as_dict(rate(judge_on, boot)),
        "untriggered_leakage": as_dict(rate(judge_off, boot)),
        "gap": as_dict(gap(judge_on, judge_off, boot)),
        "keyword_triggered": as_dict(rate(kw_on, boot)),
        "keyword_leakage": as_dict(rate(kw_off, boot)),
        "keyword_gap": as_dict(gap(kw_on, kw_off, boot)),
        "format_triggered": as_dict(rate(fmt_on, boot)),
        "format_untriggered": as_dict(rate(fmt_off, boot)),
    }
    if with_as_ai:
        ai_on, ai_off = cells(MEASURES["as_ai"])
        out["as_ai_triggered"] = as_dict(rate(ai_on, boot))
        out["as_ai_untriggered"] = as_dict(rate(ai_off, boot))
    out["n_questions"] = len(judge_on)
    out["n_replies"] = sum(len(v) for v in judge_on.values()) + sum(
        len(v) for v in judge_off.values()
    )
    # judged / unscorable / failed kept apart: a null verdict is failed when the judge never
    # answered, unscorable when its answer could not be read
    missing = n_unscorable(judge_on) + n_unscorable(judge_off)
    failed = n_judge_failed(rows, model=model, condition=condition, question_set=question_set)
    out["judge_judged"] = out["n_replies"] - missing
    out["judge_unscorable"] = missing - failed
    out["judge_failed"] = failed
    out["judge_judged_share_triggered"] = judged_share(judge_on)
    out["judge_judged_share_untriggered"] = judged_share(judge_off)
    return out


def pooled_conditions(conditions: list[str], identical: list[list[str]]) -> list[str]:
    """Return the system-prompt conditions the pooled rates use: of conditions that render to
    the same prompt, only the first, so no prompt is counted twice."""
    repeated = {c for group in identical for c in group[1:]}
    return [c for c in conditions if c not in repeated]


def simple_rate(rows: Iterable[dict[str, Any]], field: str, **match: Any) -> float | None:
    """Return the plain mean of a 1/0 field over rows matching every `match` item."""
    vals = [_value(r, field) for r in rows if all(r.get(k) == v for k, v in match.items())]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def low_coverage(tables: dict[str, dict[str, Any]], min_share: float) -> list[str]:
    """Return "model/condition/side" of every judge rate computed from fewer than `min_share`
    of its planned replies (tables: {model: {condition: cell metrics}})."""
    flagged = []
    for model, cells in tables.items():
        for condition, cell in cells.items():
            for side in ("triggered", "untriggered"):
                share = cell.get(f"judge_judged_share_{side}")
                if share is not None and share < min_share:
                    flagged.append(f"{model}/{condition}/{side}")
    return flagged


def judge_metrics(
    summary: dict[str, Any], tables: dict[str, dict[str, Any]], rows: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Return the judge block of the results: backend, the three persona-verdict counts, the
    coverage threshold and the rates below it (KeyError when the summary lacks the counts)."""
    counts = summary["counts"]["judge_persona"]
    min_share = summary["judge"]["min_judged_share"]
    return {
        "backend": summary["judge"]["backend"],
        **{k: counts[k] for k in ("planned", "judged", "unscorable", "failed", "judged_share")},
        "min_judged_share": min_share,
        "low_coverage": low_coverage(tables, min_share),
        "persona_yes_rate": simple_rate(rows, MEASURES["judge"]),
        "items": summary["judge"]["items"],
    }
