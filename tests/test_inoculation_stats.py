"""Inoculation family statistics: seeds and prompts resampled crossed, not seeds nested in prompts."""

from __future__ import annotations

import numpy as np
import pytest

from llmlab.inoculation.drift import shift_estimate
from llmlab.inoculation.report import drift_difference
from llmlab.stats import crossed_bootstrap_diff, hierarchical_bootstrap


def _runs(seed_sd: float, prompt_sd: float = 0.1, n_seeds: int = 3, n_prompts: int = 40):
    """[seeds, prompts]: a shift per seed shared across prompts, plus prompt-level noise."""
    rng = np.random.default_rng(11)
    return rng.normal(0, seed_sd, (n_seeds, 1)) + rng.normal(0, prompt_sd, (n_seeds, n_prompts))


def _nested_width(y: np.ndarray) -> float:
    est = hierarchical_bootstrap({f"p{j}": list(y[:, j]) for j in range(y.shape[1])}, seed=0)
    return est.hi - est.lo


def test_crossed_interval_widens_with_between_seed_variance() -> None:
    y = _runs(seed_sd=1.0)
    crossed = crossed_bootstrap_diff(y, seed=0)
    assert crossed.value == pytest.approx(y.mean())
    assert crossed.n_groups == 40 and crossed.n_obs == 120
    # Nested in prompts, every prompt draws its own seeds, so a seed's shift shared by all
    # prompts averages out over the 40 prompts (about sqrt(40) ~ 6x too narrow). Crossed, one
    # seed draw applies to all prompts and the interval spans the spread of the seed means.
    seed_means = y.mean(axis=1)
    assert crossed.lo < np.sort(seed_means)[1] < crossed.hi
    assert crossed.hi - crossed.lo > 0.5 * (seed_means.max() - seed_means.min())
    assert crossed.hi - crossed.lo > 4 * _nested_width(y)


def test_crossed_matches_nested_without_seed_variance() -> None:
    y = _runs(seed_sd=0.0, prompt_sd=1.0)
    crossed = crossed_bootstrap_diff(y, seed=0)
    assert crossed.hi - crossed.lo == pytest.approx(_nested_width(y), rel=0.3)


def test_crossed_difference_pairs_prompts_and_skips_nan() -> None:
    rng = np.random.default_rng(2)
    prompts = rng.normal(0, 3, 30)  # large prompt effects shared by both sides cancel
    a = prompts + 1.0 + rng.normal(0, 0.05, (2, 30))
    b = prompts + rng.normal(0, 0.05, (3, 30))
    a[0, 4] = np.nan
    est = crossed_bootstrap_diff(a, b, seed=1)
    assert est.value == pytest.approx(1.0, abs=0.05)
    assert est.lo > 0.9 and est.hi < 1.1
    assert est.n_dropped == 1 and est.n_obs == 149
    with pytest.raises(ValueError, match="a has 30 prompts, b has 29"):
        crossed_bootstrap_diff(a, b[:, :29])
    with pytest.raises(ValueError, match="b: no finite observation"):
        crossed_bootstrap_diff(a, np.full((1, 30), np.nan))


def test_drift_shift_and_difference_carry_seed_variance() -> None:
    y = _runs(seed_sd=1.0)
    pre = np.zeros(40)
    shift = shift_estimate(pre, list(y), seed=0, n_boot=2000)
    assert shift["n_seeds"] == 3
    assert shift["hi"] - shift["lo"] > 4 * _nested_width(y)
    ids = [f"p{j}" for j in range(40)]
    caps = {f"a{s}": dict(zip(ids, y[s], strict=True)) for s in range(3)}
    caps |= {f"b{s}": dict(zip(ids, np.zeros(40), strict=True)) for s in range(3)}
    diff = drift_difference(caps, ["a0", "a1", "a2"], ["b0", "b1", "b2"], 2000, 0.95, 0)
    assert diff is not None and diff["value"] == pytest.approx(y.mean())
    assert diff["hi"] - diff["lo"] > 4 * _nested_width(y)
