"""Inoculation criteria: per-layer reading of criteria 1-2, criterion 4 on v_trait, clusters."""

from __future__ import annotations

import numpy as np
import pytest

from llmlab.inoculation.criteria import (
    clustered_correlation,
    criterion_beyond_control,
    criterion_decrease,
    criterion_predicts_drift,
)


def _est(value: float, half: float = 0.01) -> dict:
    return {"value": value, "lo": value - half, "hi": value + half}


def test_opposite_signed_layers_are_named_and_fail_criterion_1() -> None:
    # The layer mean is below 0 but layer 3 moves the other way with a CI above 0.
    rows = [
        {"layer": 1, **_est(-0.05)},
        {"layer": 2, **_est(-0.04)},
        {"layer": 3, **_est(+0.06)},
        {"layer": 4, **_est(-0.001)},
    ]
    c1 = criterion_decrease(_est(-0.02), rows)
    assert c1["layers_below_zero"] == [1, 2]
    assert c1["layers_above_zero"] == [3]
    assert c1["opposite_signed_layers"] == [3]
    assert not c1["pass"]
    assert criterion_decrease(_est(-0.02), [r for r in rows if r["layer"] != 3])["pass"]


def test_layers_cancelling_to_a_null_mean_are_still_named() -> None:
    rows = [{"layer": 1, **_est(-0.05)}, {"layer": 2, **_est(+0.05)}]
    c2 = criterion_beyond_control(_est(0.0, 0.02), "control_01", rows)
    assert not c2["pass"]
    assert c2["opposite_signed_layers"] == [1, 2]


def _clusters(between: float, within: float, seed: int = 0):
    """9 runs in 3 conditions: condition means move x and y together by `between`;
    within a condition, y follows x with slope `within`."""
    rng = np.random.default_rng(seed)
    x, y, c = [], [], []
    for k, cond in enumerate(("neutral", "inoculation", "loss_matched")):
        dx = rng.standard_normal(3) * 0.01
        x += list(between * k + dx)
        y += list(between * k + within * dx + 0.002 * rng.standard_normal(3))
        c += [cond] * 3
    return x, y, c


def test_clustered_correlation_does_not_count_the_condition_effect_nine_times() -> None:
    x, y, c = _clusters(between=1.0, within=0.0)
    out = clustered_correlation(x, y, c)
    # Pooled over 9 runs the condition effect alone looks like a sure correlation ...
    assert out["pooled"]["lo"] > 0.9
    # ... within conditions there is none, on n - k - 2 = 4 degrees of freedom.
    assert out["within"]["dof"] == 4
    assert out["within"]["lo"] < 0 < out["within"]["hi"]
    assert out["between"]["same_order"] and out["between"]["n"] == 3
    strong = clustered_correlation(*_clusters(between=0.0, within=1.0))
    assert strong["within"]["lo"] > 0


def _run(cond: str, seed: int, align: float, proj: float, caps: float) -> dict:
    return {"name": f"{cond}_s{seed}", "condition": cond, "align": align,
            "projection_drift": proj, "drift": caps}  # fmt: skip


def _runs(ino_align: float, ino_proj: float) -> list[dict]:
    out = []
    for s in range(3):
        out += [
            _run("neutral", s, 0.05 + 0.001 * s, 1.0 + 0.01 * s, 0.4),
            _run("inoculation", s, ino_align + 0.001 * s, ino_proj + 0.01 * s, 0.1),
            _run("loss_matched", s, 0.04 + 0.001 * s, 0.8 + 0.01 * s, 0.3),
            _run("baseline_normal", s, 0.0, 0.0, 0.0),  # not a CAPS condition: left out
        ]
    return out


def test_criterion_4_reads_the_projection_shift_against_the_loss_matched_control() -> None:
    out = criterion_predicts_drift(_runs(0.01, 0.2), _est(-0.6, 0.1), _est(-0.2, 0.05))
    assert out["pass"] and out["n_runs"] == 9 and out["same_order"]
    assert out["correlation"]["n_clusters"] == 3
    # Caps drop but the projection along v_trait does not (CI covers 0): no pass.
    out = criterion_predicts_drift(_runs(0.01, 0.2), _est(-0.05, 0.1), _est(-0.2, 0.05))
    assert not out["pass"] and out["caps_inoculation_below_control"]
    # Projection drops but training alignment is not below the control's: no pass.
    out = criterion_predicts_drift(_runs(0.06, 0.2), _est(-0.6, 0.1), None)
    assert not out["pass"] and not out["align_inoculation_below_control"]


def test_criterion_4_without_a_control_run_is_not_evaluable() -> None:
    runs = [r for r in _runs(0.01, 0.2) if r["condition"] != "loss_matched"]
    out = criterion_predicts_drift(runs, None, None)
    assert not out["evaluable"] and not out["pass"]
    assert out["basis"].startswith("not evaluable")


def test_clustered_correlation_with_one_run_per_condition_has_no_within_interval() -> None:
    out = clustered_correlation([0.1, 0.2, 0.3], [1.0, 2.0, 3.5], ["a", "b", "c"])
    assert out["within"]["r"] is None and out["between"]["same_order"]


def test_projection_shift_difference_reads_the_drift_projections(tmp_path) -> None:
    from llmlab.inoculation.report import projection_shifts, run_difference

    rng = np.random.default_rng(0)
    base = rng.standard_normal((20, 4))
    sd = base.std(axis=0, ddof=1)
    # Inoculation runs move 0.5 base-SD along v at every layer, control runs 1.5.
    arrays = {"base": base, "layers": np.arange(4)}
    for s in range(2):
        arrays[f"inoculation_s{s}"] = base + 0.5 * sd + 0.01 * rng.standard_normal((20, 4))
        arrays[f"loss_matched_s{s}"] = base + 1.5 * sd + 0.01 * rng.standard_normal((20, 4))
    np.savez(tmp_path / "p.npz", **arrays)
    names = [k for k in arrays if k not in ("base", "layers")]
    shifts = projection_shifts(tmp_path / "p.npz", names)
    assert shifts["inoculation_s0"].shape == (20,)
    assert shifts["inoculation_s0"].mean() == pytest.approx(0.5, abs=0.02)
    d = run_difference(
        shifts, ["inoculation_s0", "inoculation_s1"], ["loss_matched_s0", "loss_matched_s1"],
        n_boot=400, ci=0.95, seed=0,
    )  # fmt: skip
    assert d["value"] == pytest.approx(-1.0, abs=0.02) and d["hi"] < 0
    assert run_difference(shifts, ["inoculation_s0"], [], n_boot=400, ci=0.95, seed=0) is None
