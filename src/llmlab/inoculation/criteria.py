"""The plan's four acceptance criteria and the verdict, as pure functions of the stage outputs.

All alignment numbers are trait-ward alignments cos(-g_l, v_l) at pre_assistant, averaged over
the alignment layers (see `llmlab.inoculation.common` for the sign convention).
1. alignment decreases under inoculation vs neutral: paired CI of (inoculation - neutral) < 0,
   and no layer's own CI above 0 (per-layer estimates reported; opposite-signed layers named);
2. more than under the loss-matched control: paired CI of (inoculation - control) < 0, same
   per-layer rule;
3. specific: the layer-mean change beats every null of `llmlab.inoculation.nulls`;
4. (best) lower alignment during training goes with less drift along v_trait: inoculation vs
   the loss-matched control on training alignment and on the post-finetune projection shift,
   the conditions ordered alike; the caps shift is the behavioural companion and the
   correlation over runs is reported cluster-aware (runs share their condition).
Claim when 1-3 pass (4 is reported beside it); otherwise the verdict is null.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.stats as sps

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


def criterion_specific(
    layer_mean: dict[str, Any], threshold: float, n_random: int, nulls: dict[str, Any]
) -> dict[str, Any]:
    """Return criterion 3: the layer-mean trait delta against every null of `nulls`.

    Passes only when the trait's delta is at or below the threshold percentile of each random
    null (independent per layer, shared across layers, layer-correlated) and below the delta
    of every other-trait direction built with the same prompt template.
    """
    return {
        "name": "specific relative to random and other-trait directions",
        "percentile": layer_mean["percentile"],
        "trait_delta": layer_mean["trait_delta"],
        "random_p05": layer_mean["random_p05"],
        "n_random": n_random,
        "percentile_by_null": {k: v["percentile"] for k, v in nulls["random_nulls"].items()},
        "worst_percentile": nulls["worst_percentile"],
        "other_trait_deltas": nulls["other_traits"],
        "beats_random_nulls": nulls["beats_random_nulls"],
        "beats_other_traits": nulls["beats_other_traits"],
        "pass": bool(nulls["pass"]),
        "rule": f"layer-mean trait delta at or below the {threshold:g}th percentile of the "
        "independent, shared-across-layer and layer-correlated random nulls, and below every "
        "other-trait direction's delta",
    }


def _rank(values: list[float]) -> list[int]:
    order = np.argsort(np.asarray(values, dtype=float), kind="stable")
    ranks = np.empty(len(values), dtype=int)
    ranks[order] = np.arange(len(values))
    return ranks.tolist()


def per_layer_check(rows: list[dict[str, Any]], mean_est: dict[str, Any]) -> dict[str, Any]:
    """Return the layers whose paired CI excludes 0 on each side of the layer-mean estimate.

    rows: [{layer, value, lo, hi}]. A layer whose interval lies on the other side of zero
    from the layer mean is 'opposite-signed': averaging it in hides a real effect of the
    other sign, so it is named rather than left to cancel.
    """
    below = [r["layer"] for r in rows if r["hi"] is not None and r["hi"] < 0]
    above = [r["layer"] for r in rows if r["lo"] is not None and r["lo"] > 0]
    sign = np.sign(mean_est.get("value") or 0.0)
    opposite = above if sign <= 0 else below
    return {
        "per_layer": rows,
        "layers_below_zero": below,
        "layers_above_zero": above,
        "opposite_signed_layers": opposite if sign != 0 else below + above,
    }


def criterion_decrease(
    delta: dict[str, Any], per_layer: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Return criterion 1 from the paired (inoculation - neutral) alignment estimate.

    With per-layer estimates, the criterion also needs no layer whose CI lies above 0.
    """
    layers = per_layer_check(per_layer or [], delta)
    return {
        "name": "cos alignment decreases under inoculation vs neutral",
        "estimate": delta,
        **layers,
        "pass": ci_below_zero(delta) and not layers["layers_above_zero"],
        "rule": "95% CI of the layer mean of (align_inoculation - align_neutral) lies below 0 "
        "and no layer's CI lies above 0",
    }


def criterion_beyond_control(
    delta_vs_control: dict[str, Any], control: str, per_layer: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Return criterion 2 from the paired (inoculation - loss-matched control) estimate."""
    layers = per_layer_check(per_layer or [], delta_vs_control)
    return {
        "name": "decrease larger than under the loss-matched control",
        "control": control,
        "estimate": delta_vs_control,
        **layers,
        "pass": ci_below_zero(delta_vs_control) and not layers["layers_above_zero"],
        "rule": "95% CI of the layer mean of (align_inoculation - align_control) lies below 0 "
        "and no layer's CI lies above 0",
    }


def clustered_correlation(
    x: list[float], y: list[float], clusters: list[str], ci: float = 0.95
) -> dict[str, Any]:
    """Return Pearson r over runs split into between- and within-condition parts.

    Runs of one condition share its system prompt, so they are not independent draws of
    (alignment, drift): a pooled r over 9 runs in 3 conditions counts the condition effect
    9 times. Between: r of the condition means (n = number of conditions; no interval below
    4 conditions). Within: r of the runs centred on their condition means, i.e. the partial
    correlation given the condition, with a Fisher-z interval on n - k - 2 degrees of
    freedom (k conditions). Written here because `llmlab.stats.pearson_ci` takes no
    covariates; its SE 1/sqrt(n-3) on centred values would overstate the information.
    The pooled r is reported for reference only.
    """
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    cl = np.asarray(clusters)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya, cl = xa[ok], ya[ok], cl[ok]
    names = sorted(set(cl.tolist()))
    n, k = int(xa.size), len(names)
    out: dict[str, Any] = {"n_runs": n, "n_clusters": k}
    try:
        out["pooled"] = pearson_ci(xa, ya, ci).to_dict()
    except ValueError as e:
        out["pooled"] = {"r": None, "reason": str(e)}
    mx = np.array([xa[cl == c].mean() for c in names])
    my = np.array([ya[cl == c].mean() for c in names])
    between: dict[str, Any] = {"n": k, "same_order": k >= 2 and _rank(list(mx)) == _rank(list(my))}
    if k >= 3 and np.ptp(mx) > 0 and np.ptp(my) > 0:
        between["r"] = float(np.corrcoef(mx, my)[0, 1])
    out["between"] = between
    xc = xa - np.array([mx[names.index(c)] for c in cl])
    yc = ya - np.array([my[names.index(c)] for c in cl])
    dof = n - k - 2
    within: dict[str, Any] = {"n": n, "dof": dof}
    if dof < 1 or np.ptp(xc) == 0 or np.ptp(yc) == 0:
        within.update(r=None, reason=f"needs n - k - 2 >= 1 and spread within conditions "
                      f"(n={n}, k={k})")  # fmt: skip
    else:
        r = float(np.clip(np.corrcoef(xc, yc)[0, 1], -0.999999, 0.999999))
        crit = float(sps.norm.ppf(0.5 + ci / 2.0))
        z, se = math.atanh(r), 1.0 / math.sqrt(dof)
        within.update(r=r, lo=math.tanh(z - crit * se), hi=math.tanh(z + crit * se))
    out["within"] = within
    return out


CONDITIONS_C4 = ("neutral", "inoculation", "loss_matched")


def criterion_predicts_drift(
    runs: list[dict[str, Any]],
    proj_inoc_minus_control: dict[str, Any] | None,
    caps_inoc_minus_control: dict[str, Any] | None = None,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Return criterion 4: lower training alignment goes with less drift along v_trait.

    runs: [{name, condition, align, projection_drift, drift}] with align the mean trait-ward
    alignment logged during training, projection_drift the layer-mean projection shift onto
    v_l (post - pre, base-SD units) and drift the caps-fraction shift (None: unscorable).
    Only the CAPS-trained conditions (neutral, inoculation, loss_matched) enter. Passes when
    (i) inoculation's mean training alignment is below the loss-matched control's and its
    projection shift is below the control's (crossed seed x prompt 95% CI < 0), and
    (ii) the conditions' order by training alignment equals their order by projection shift.
    The caps shift is the behavioural companion (same comparisons, reported); the
    correlation over runs is reported cluster-aware (`clustered_correlation`).
    """
    runs = [r for r in runs if r["condition"] in CONDITIONS_C4]
    out: dict[str, Any] = {
        "name": "reduced alignment predicts reduced finetune drift along v_trait",
        "n_runs": len(runs),
        "runs": runs,
        "rule": "inoculation's mean training alignment below the loss-matched control's, its "
        "projection shift along v_trait below the control's (crossed seed x prompt 95% CI < "
        "0), and the conditions ordered alike by training alignment and projection shift",
    }
    align_of = {
        c: float(np.mean([r["align"] for r in runs if r["condition"] == c]))
        for c in CONDITIONS_C4
        if any(r["condition"] == c for r in runs)
    }
    proj_of = {
        c: float(np.mean(v))
        for c in align_of
        if (v := [r["projection_drift"] for r in runs
                  if r["condition"] == c and r["projection_drift"] is not None])
    }  # fmt: skip
    have = "inoculation" in align_of and "loss_matched" in align_of
    out["evaluable"] = bool(have and proj_inoc_minus_control is not None
                            and proj_inoc_minus_control.get("value") is not None)  # fmt: skip
    out["align_by_condition"] = align_of
    out["projection_shift_by_condition"] = proj_of
    out["projection_inoculation_minus_control"] = proj_inoc_minus_control
    out["caps_inoculation_minus_control"] = caps_inoc_minus_control
    conds = [c for c in align_of if c in proj_of]
    out["same_order"] = len(conds) >= 2 and _rank([align_of[c] for c in conds]) == _rank(
        [proj_of[c] for c in conds]
    )
    out["correlation"] = clustered_correlation(
        [r["align"] for r in runs],
        [np.nan if r["projection_drift"] is None else r["projection_drift"] for r in runs],
        [r["condition"] for r in runs],
        ci,
    )
    out["caps_correlation"] = clustered_correlation(
        [r["align"] for r in runs],
        [np.nan if r["drift"] is None else r["drift"] for r in runs],
        [r["condition"] for r in runs],
        ci,
    )
    if not out["evaluable"]:
        out["basis"] = (
            "not evaluable (needs inoculation and loss-matched runs with a projection shift)"
        )
        out["pass"] = False
        return out
    align_lower = align_of["inoculation"] < align_of["loss_matched"]
    proj_lower = ci_below_zero(proj_inoc_minus_control)  # type: ignore[arg-type]
    out["align_inoculation_below_control"] = align_lower
    out["projection_inoculation_below_control"] = proj_lower
    out["caps_inoculation_below_control"] = bool(
        caps_inoc_minus_control is not None and ci_below_zero(caps_inoc_minus_control)
    )
    out["basis"] = (
        f"inoculation vs loss-matched over {len(runs)} runs in {len(align_of)} conditions: "
        f"training alignment {'lower' if align_lower else 'not lower'}, projection shift "
        f"{fmt_est(proj_inoc_minus_control, 3)}"
    )
    out["pass"] = bool(align_lower and proj_lower and out["same_order"])
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
        f"random-direction percentile {c3['percentile']:.1f} (worst null "
        f"{c3.get('worst_percentile', c3['percentile']):.1f}); "
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
