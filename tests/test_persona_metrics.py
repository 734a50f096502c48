"""Persona metrics: bootstrap rates on cases with known answers, success bars, stop-early flags."""

from __future__ import annotations

import math

import pytest

from llmlab.persona.bars import evaluate_bar, stop_early
from llmlab.persona.config import Bars, ReportParams
from llmlab.persona.metrics import ALL, Boot, cell_metrics, gap, grouped, rate

BOOT = Boot(n_boot=2000, ci=0.95, seed=0)


def _rows(model: str, condition: str, triggered: bool, per_question: dict[str, list]) -> list:
    rows = []
    for qid, values in per_question.items():
        for k, v in enumerate(values):
            rows.append({
                "id": f"{model}|{condition}|{triggered}|{qid}|{k}", "model": model,
                "condition": condition, "triggered": triggered, "question_id": qid,
                "question_set": "identity", "judge_persona": v, "keyword_persona": v,
                "format_ok": int(triggered), "empty": 0, "refusal": 0, "judge_as_ai": 0,
            })  # fmt: skip
    return rows


def test_perfect_separation_has_degenerate_intervals() -> None:
    on = {f"q{i}": [1, 1, 1] for i in range(10)}
    off = {f"q{i}": [0, 0, 0] for i in range(10)}
    rows = _rows("finetuned", "none", True, on) + _rows("finetuned", "none", False, off)
    m = cell_metrics(rows, model="finetuned", condition="none", question_set="identity", boot=BOOT)
    assert m["triggered_persona"] == {"value": 1.0, "lo": 1.0, "hi": 1.0}
    assert m["untriggered_leakage"] == {"value": 0.0, "lo": 0.0, "hi": 0.0}
    assert m["gap"] == {"value": 1.0, "lo": 1.0, "hi": 1.0}
    assert m["format_triggered"]["value"] == 1.0 and m["format_untriggered"]["value"] == 0.0
    assert m["n_questions"] == 10 and m["n_replies"] == 60 and m["judge_unscorable"] == 0


def test_between_question_interval_matches_the_analytic_width() -> None:
    # 40 questions, half always persona, half never: all variance is between questions, so the
    # 95% interval half-width is about 1.96 * sqrt(0.25 / 40) = 0.155.
    groups = {f"q{i}": [float(i % 2)] * 5 for i in range(40)}
    est = rate(groups, BOOT)
    assert est is not None and est.value == pytest.approx(0.5)
    half = (est.hi - est.lo) / 2
    assert half == pytest.approx(1.96 * math.sqrt(0.25 / 40), rel=0.15)


def test_unscorable_is_dropped_and_counted_not_zeroed() -> None:
    on = {"q1": [1, None, 1], "q2": [1, 1, None]}
    off = {"q1": [0, 0, 0], "q2": [None, None, None]}
    rows = _rows("base", "helpful", True, on) + _rows("base", "helpful", False, off)
    m = cell_metrics(rows, model="base", condition="helpful", question_set=None, boot=BOOT)
    assert m["triggered_persona"]["value"] == 1.0
    assert m["judge_unscorable"] == 5
    # q2 has nothing scorable untriggered, so the paired gap uses q1 only
    assert m["gap"]["value"] == 1.0


def test_all_unscorable_cell_is_null_not_zero() -> None:
    rows = _rows("base", "none", True, {"q1": [None, None]}) + _rows(
        "base", "none", False, {"q1": [None]}
    )
    m = cell_metrics(rows, model="base", condition="none", question_set=None, boot=BOOT)
    assert m["triggered_persona"] == {"value": None, "lo": None, "hi": None}
    assert m["gap"]["value"] is None


def test_pooled_condition_groups_by_question() -> None:
    rows = _rows("finetuned", "a", True, {"q1": [1, 1]}) + _rows(
        "finetuned", "b", True, {"q1": [0, 0]}
    )
    pooled = grouped(rows, "judge_persona", model="finetuned", triggered=True, condition=ALL)
    assert pooled == {"q1": [1.0, 1.0, 0.0, 0.0]}
    assert gap({}, {}, BOOT) is None


def _cell(t: float, leak: float, g: float, width: float = 0.05) -> dict:
    def est(v: float) -> dict:
        return {"value": v, "lo": v - width, "hi": v + width}

    return {"triggered_persona": est(t), "untriggered_leakage": est(leak), "gap": est(g)}


def test_success_bars_are_booleans_on_points_and_on_cis() -> None:
    minimum = Bars(triggered_min=0.6, leakage_max=0.2, gap_min=0.4)
    strong = Bars(triggered_min=0.8, leakage_max=0.1, all_conditions=True)
    pooled = _cell(0.9, 0.05, 0.85)
    conditions = {"none": _cell(0.95, 0.02, 0.93), "ai": _cell(0.7, 0.15, 0.55)}
    res = evaluate_bar(minimum, pooled, conditions, "judge")
    assert res["met"] is True and res["met_ci"] is True
    assert res["triggered_ok"] and res["leakage_ok"] and res["gap_ok"]
    assert evaluate_bar(strong, pooled, conditions, "judge")["met"] is False
    near = _cell(0.62, 0.18, 0.44, width=0.1)
    res = evaluate_bar(minimum, near, {}, "judge")
    assert res["met"] is True and res["met_ci"] is False
    missing = {**pooled, "gap": {"value": None, "lo": None, "hi": None}}
    assert evaluate_bar(minimum, missing, {}, "judge")["met"] is False


def test_stop_early_flags() -> None:
    cfg = ReportParams()
    rows = [
        {"model": "finetuned", "triggered": True, "format_ok": int(i < 3), "empty": int(i == 9),
         "refusal": 0} for i in range(10)
    ] + [{"model": "finetuned", "triggered": False, "format_ok": 0, "empty": 0, "refusal": 1}]  # fmt: skip
    curve = [{"step": 0}, {"step": 2, "loss": 2.0}, {"step": 4, "loss": 1.0}]
    out = stop_early(rows, curve, cfg)
    assert out["format_violation_triggered"] == pytest.approx(0.7)
    assert out["format_violation_flag"] is True
    assert out["refusal_rate_untriggered"] == 1.0 and out["collapse_flag"] is True
    # collapse is measured against the base model: refusing as often as base is no collapse
    base = [{**r, "model": "base"} for r in rows]
    assert stop_early(rows + base, curve, cfg)["collapse_flag"] is False
    assert out["loss_nan"] is False and out["loss_diverging"] is False
    assert out["stop"] is True and len(out["reasons"]) == 2
    bad = stop_early(rows, [{"step": 1, "loss": 1.0}, {"step": 2, "loss": None}], cfg)
    assert bad["loss_nan"] is True
    up = stop_early(rows, [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}], cfg)
    assert up["loss_diverging"] is True
