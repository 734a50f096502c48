"""B1 detection (steered or not) and the food-task check, read from yes/no log-probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats as sps

from llmlab.introspection.conversation import detection_messages
from llmlab.introspection.examples import Row, row_steer
from llmlab.introspection.scoring import choice_scores, yes_no_choices
from llmlab.introspection.vectors import VectorBank
from llmlab.models import LoadedModel
from llmlab.stats import D_PRIME_CLIP, D_PRIME_CLIP_RULE, d_prime, proportion_ci

D_PRIME_BOOT = 2000


def d_prime_interval(
    steered_yes: Sequence[bool], clean_yes: Sequence[bool], seed: int = 0, ci: float = 0.95
) -> tuple[float, float]:
    """Return the percentile bootstrap interval of d', steered and clean trials resampled apart.

    scipy's bootstrap draws the two groups independently; d' uses the same clipping as the
    point estimate. A group whose yes rate is the same in every resample gives a degenerate
    (zero-width) interval rather than an error.
    """
    lo_clip, hi_clip = D_PRIME_CLIP

    def stat(hit: np.ndarray, fa: np.ndarray, axis: int = -1) -> np.ndarray:
        tpr = np.clip(hit.mean(axis=axis), lo_clip, hi_clip)
        fpr = np.clip(fa.mean(axis=axis), lo_clip, hi_clip)
        return sps.norm.ppf(tpr) - sps.norm.ppf(fpr)

    a = np.asarray(steered_yes, dtype=float)
    b = np.asarray(clean_yes, dtype=float)
    res = sps.bootstrap(
        (a, b),
        stat,
        n_resamples=D_PRIME_BOOT,
        confidence_level=ci,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    lo, hi = res.confidence_interval
    point = float(stat(a, b))
    # Percentile bounds are nan when every resample gives the same d'.
    return (point, point) if np.isnan(lo) or np.isnan(hi) else (float(lo), float(hi))


def yes_no_trials(
    loaded: LoadedModel,
    bank: VectorBank | None,
    trials: Sequence[Row],
    questions: Sequence[str],
    reply: str,
    batch_size: int,
    prefix: str = "",
) -> list[dict[str, Any]]:
    """Return one record per trial: said_yes (P(yes) > P(no)), P(yes) renormalised, mass.

    The label is read after the answer prefix (the anchor's "The answer is"), yes against no.
    """
    convs = [
        detection_messages(t["context"], reply, questions[i % len(questions)])
        for i, t in enumerate(trials)
    ]
    specs = [
        row_steer(loaded, bank, c, t.get("steer")) if bank is not None else None
        for c, t in zip(convs, trials, strict=True)
    ]
    scores = choice_scores(
        loaded, convs, [yes_no_choices(loaded)] * len(trials), specs, batch_size, prefix=prefix
    )
    out = []
    for i, t in enumerate(trials):
        p_yes = float(scores.normalised(i)[0])
        steer = t.get("steer") or {}
        out.append(
            {
                "id": t["id"],
                "steered": t.get("steered"),
                "label": t.get("label"),
                "said_yes": bool(p_yes > 0.5),
                "p_yes": p_yes,
                "choice_mass": float(scores.mass[i]),
                "third": steer.get("third"),
                "layer": steer.get("layer"),
                "strength": steer.get("strength"),
                "vector_set": steer.get("set"),
                "concept": steer.get("concept"),
            }
        )
    return out


def detection_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return accuracy (Wilson CI), TPR, FPR, d' (clipping rule stated) and per-bin TPR."""
    steered = [r for r in records if r["steered"]]
    clean = [r for r in records if not r["steered"]]
    hits = sum(r["said_yes"] for r in steered)
    fas = sum(r["said_yes"] for r in clean)
    dp = d_prime(hits, len(steered) - hits, fas, len(clean) - fas).to_dict()
    dp["lo"], dp["hi"] = d_prime_interval(
        [r["said_yes"] for r in steered], [r["said_yes"] for r in clean]
    )
    dp["interval"] = f"{D_PRIME_BOOT} bootstrap resamples, steered and clean trials apart"
    correct = hits + len(clean) - fas
    by_bin: dict[str, dict[str, Any]] = {}
    for key in ("third", "strength"):
        groups: dict[str, list[bool]] = {}
        for r in steered:
            groups.setdefault(str(r[key]), []).append(r["said_yes"])
        by_bin[key] = {
            k: proportion_ci(int(sum(v)), len(v)).to_dict() for k, v in sorted(groups.items())
        }
    return {
        "n": len(records),
        "n_steered": len(steered),
        "accuracy": proportion_ci(correct, len(records)).to_dict(),
        "tpr": proportion_ci(hits, len(steered)).to_dict(),
        "fpr": proportion_ci(fas, len(clean)).to_dict(),
        "d_prime": dp,
        "d_prime_rule": D_PRIME_CLIP_RULE,
        "tpr_by": by_bin,
        "mean_choice_mass": float(np.mean([r["choice_mass"] for r in records])),
    }


def food_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return the food-task accuracy (Wilson CI) and its yes rate."""
    correct = sum((r["label"] == "yes") == r["said_yes"] for r in records)
    return {
        "n": len(records),
        "accuracy": proportion_ci(int(correct), len(records)).to_dict(),
        "yes_rate": float(np.mean([r["said_yes"] for r in records])),
    }
