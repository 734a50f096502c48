"""The plan's four acceptance criteria and the verdict, as pure functions of the stage outputs.

All alignment numbers are trait-ward alignments cos(-g_l, v_l) at pre_assistant, averaged over
the alignment layers (see `llmlab.inoculation.common` for the sign convention).
1. alignment decreases under inoculation vs neutral: paired CI of (inoculation - neutral) < 0;
2. more than under the loss-matched control: paired CI of (inoculation - control) < 0;
3. specific: the layer-mean change sits at or below the threshold percentile of the changes
   of random unit directions;
4. (best) lower alignment during training goes with lower drift: across >= 4 runs, Pearson r
   between mean training alignment and the caps-fraction shift has a CI above 0; with fewer
   runs, the conditions' order by alignment must equal their order by drift and the
   inoculation run(s) must drift less than the neutral ones (paired CI < 0).
Claim when 1-3 pass (4 is reported beside it); otherwise the verdict is null.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmlab.stats import Estimate, pearson_ci


def ci_below_zero(est: dict[str, Any] | Estimate) -> bool:
    """Return whether an interval lies entirely below zero."""
    hi = est.hi if isinstance(est, Estimate) else est.get("hi")
    return hi is not None and hi < 0


def fmt_est(est: dict[str, Any] | None, digits: int = 4) -> str:
    """Return 'value [lo, hi]' of an estimate dict, or 'n/a'."""
    if not est or est.get("value") is None:
        return "n/a"
    return f"{est['value']:+.{digits}f} [{est['lo']:+.{digits}f}, {est['hi']:+.{digits}f}]"


def criterion_decrease(delta: dict[str, Any]) -> dict[str, Any]:
    """Return criterion 1 from the paired (inoculation - neutral) alignment estimate."""
    return {
        "name": "cos alignment decreases under inoculation vs neutral",
        "estimate": delta,
        "pass": ci_below_zero(delta),
        "rule": "95% CI of mean(align_inoculation - align_neutral) lies below 0",
    }


def criterion_beyond_control(delta_vs_control: dict[str, Any], control: str) -> dict[str, Any]:
    """Return criterion 2 from the paired (inoculation - loss-matched control) estimate."""
    return {
        "name": "decrease larger than under the loss-matched control",
        "control": control,
        "estimate": delta_vs_control,
        "pass": ci_below_zero(delta_vs_control),
        "rule": "95% CI of mean(align_inoculation - align_control) lies below 0",
    }


def criterion_specific(
    layer_mean: dict[str, Any], threshold: float, n_random: int
) -> dict[str, Any]:
    """Return criterion 3 from the layer-mean random-direction comparison."""
    return {
        "name": "specific relative to random directions",
        "percentile": layer_mean["percentile"],
        "trait_delta": layer_mean["trait_delta"],
        "random_p05": layer_mean["random_p05"],
        "n_random": n_random,
        "pass": layer_mean["percentile"] <= threshold,
        "rule": f"layer-mean trait delta at or below the {threshold:g}th percentile of random deltas",
    }


def _rank(values: list[float]) -> list[int]:
    order = np.argsort(np.asarray(values, dtype=float), kind="stable")
    ranks = np.empty(len(values), dtype=int)
    ranks[order] = np.arange(len(values))
    return ranks.tolist()


def criterion_predicts_drift(
    runs: list[dict[str, Any]],
    by_condition_align: dict[str, float],
    by_condition_drift: dict[str, float | None],
    inoc_vs_neutral_drift: dict[str, Any] | None,
) -> dict[str, Any]:
    """Return criterion 4 from per-run (mean training alignment, caps shift) pairs.

    runs: [{name, align, drift}] with drift possibly None (unscorable).
    """
    pairs = [(r["align"], r["drift"]) for r in runs if r["drift"] is not None]
    out: dict[str, Any] = {
        "name": "reduced alignment predicts reduced finetune drift",
        "n_runs": len(pairs),
        "runs": runs,
    }
    out["evaluable"] = len(pairs) >= 2
    if not out["evaluable"]:
        out["basis"] = f"not evaluable ({len(pairs)} runs with a scorable caps shift)"
        out["pass"] = False
        out["rule"] = "needs >= 2 runs whose answers have letters"
        return out
    if len(pairs) >= 4:
        x, y = zip(*pairs, strict=True)
        out["basis"] = "pearson across runs"
        try:
            corr = pearson_ci(x, y).to_dict()
            out["correlation"] = corr
            out["pass"] = corr["lo"] > 0
        except ValueError as e:
            out["correlation"] = None
            out["reason"] = str(e)
            out["pass"] = False
        out["rule"] = (
            "Pearson r(mean training alignment, caps shift) across runs has a 95% CI above 0"
        )
        return out
    conds = [c for c in by_condition_align if by_condition_drift.get(c) is not None]
    same_order = len(conds) >= 2 and _rank([by_condition_align[c] for c in conds]) == _rank(
        [by_condition_drift[c] for c in conds]  # type: ignore[misc]
    )
    inoc_less = inoc_vs_neutral_drift is not None and ci_below_zero(inoc_vs_neutral_drift)
    out["basis"] = f"ordering across conditions ({len(pairs)} runs; a correlation needs >= 4)"
    out["same_order"] = same_order
    out["inoculation_minus_neutral_drift"] = inoc_vs_neutral_drift
    out["pass"] = bool(same_order and inoc_less)
    out["rule"] = (
        "conditions ordered alike by mean training alignment and by caps shift, and the "
        "inoculation caps shift below the neutral one (paired 95% CI < 0)"
    )
    return out


def verdict(criteria: dict[str, dict[str, Any]], loss_delta: dict[str, Any]) -> tuple[str, str]:
    """Return ("claim" | "null", one line with the figures behind it)."""
    c1, c2, c3, c4 = (
        criteria[k]
        for k in ("c1_decrease", "c2_beyond_control", "c3_specific", "c4_predicts_drift")
    )
    figures = (
        f"d_align(inoc-neutral) {fmt_est(c1['estimate'])}; "
        f"d_align(inoc-{c2['control']}) {fmt_est(c2['estimate'])}; "
        f"random-direction percentile {c3['percentile']:.1f}; "
        f"d_loss(inoc-neutral) {fmt_est(loss_delta, 3)}; "
        f"drift link {'yes' if c4['pass'] else 'no' if c4.get('evaluable', True) else 'n/a'} "
        f"({c4['basis']})"
    )
    if c1["pass"] and c2["pass"] and c3["pass"]:
        return (
            "claim",
            f"claim: inoculation rotates gradients away from the trait direction - {figures}",
        )
    failed = [n for n, c in (("1", c1), ("2", c2), ("3", c3)) if not c["pass"]]
    loss_down = ci_below_zero(loss_delta)
    why = (
        "inoculation lowers the loss, so it may act mostly via loss reduction"
        if loss_down
        else "inoculation does not measurably lower the loss either"
    )
    return "null", f"null (criteria {', '.join(failed)} fail; {why}) - {figures}"
