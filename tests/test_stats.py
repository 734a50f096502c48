"""Tests for llmlab.stats: known answers, scipy agreement and bootstrap coverage."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from llmlab import stats
from llmlab.stats import (
    D_PRIME_CLIP_RULE,
    Estimate,
    bootstrap_diff,
    d_prime,
    hierarchical_bootstrap,
    kl_divergence,
    pairwise_accuracy,
    pearson_ci,
    proportion_ci,
    sign_agreement,
    spearman_ci,
)

# --- hierarchical bootstrap -----------------------------------------------------------------


def test_identical_constant_groups_give_point_interval() -> None:
    est = hierarchical_bootstrap({f"q{i}": [0.7] * 5 for i in range(10)}, n_boot=300)
    assert est.value == pytest.approx(0.7)
    assert est.lo == pytest.approx(0.7)
    assert est.hi == pytest.approx(0.7)
    assert (est.n_groups, est.n_obs, est.n_dropped) == (10, 50, 0)


def test_two_constant_groups_interval_spans_group_means() -> None:
    # Resampling two groups gives {0,0}, {1,1} with probability 1/4 each and {0,1} with 1/2,
    # so the replicate distribution is 0 / 0.5 / 1 and the 95% interval is [0, 1].
    est = hierarchical_bootstrap({"a": [0.0] * 500, "b": [1.0] * 500}, n_boot=2000)
    assert est.value == pytest.approx(0.5)
    assert est.lo == pytest.approx(0.0)
    assert est.hi == pytest.approx(1.0)


def test_two_noisy_groups_interval_driven_by_group_resampling() -> None:
    rng = np.random.default_rng(1)
    data = [rng.normal(0.0, 0.1, 400), rng.normal(1.0, 0.1, 400)]
    est = hierarchical_bootstrap(data, n_boot=2000)
    assert est.value == pytest.approx(0.5, abs=0.02)
    assert est.lo < 0.05 and est.hi > 0.95
    # Within-group noise alone would give an interval about 0.01 wide; groups dominate.
    assert est.hi - est.lo > 0.9


def test_point_estimate_is_pooled_mean_and_group_mean_option() -> None:
    data = {"a": [1.0, 1.0, 1.0], "b": [0.0]}
    assert hierarchical_bootstrap(data, n_boot=50).value == pytest.approx(0.75)
    est = hierarchical_bootstrap(data, n_boot=50, statistic="group_mean")
    assert est.value == pytest.approx(0.5)


def test_nan_observations_are_dropped_and_counted() -> None:
    data = {"a": [1.0, math.nan, 0.0], "b": [math.nan, math.nan], "c": [1.0]}
    est = hierarchical_bootstrap(data, n_boot=100)
    assert est.n_dropped == 3
    assert est.n_groups == 2
    assert est.n_obs == 3
    assert est.value == pytest.approx(2 / 3)


def test_sequence_and_mapping_inputs_agree_and_seed_is_reproducible() -> None:
    rng = np.random.default_rng(2)
    seq = [list(rng.random(rng.integers(1, 8))) for _ in range(15)]
    mapping = {str(i): v for i, v in enumerate(seq)}
    a = hierarchical_bootstrap(seq, n_boot=500, seed=3)
    b = hierarchical_bootstrap(mapping, n_boot=500, seed=3)
    assert a == b
    assert hierarchical_bootstrap(seq, n_boot=500, seed=4) != a


def test_empty_input_raises() -> None:
    with pytest.raises(ValueError, match="no groups"):
        hierarchical_bootstrap({})
    with pytest.raises(ValueError, match="no groups"):
        hierarchical_bootstrap([])
    with pytest.raises(ValueError, match="NaN or every group is empty"):
        hierarchical_bootstrap({"a": [math.nan], "b": []})
    with pytest.raises(ValueError, match="statistic"):
        hierarchical_bootstrap({"a": [1.0]}, statistic="median")


def test_chunked_resampling_matches_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    data = [list(rng.normal(rng.normal(0, 1), 1, 10)) for _ in range(30)]
    whole = hierarchical_bootstrap(data, n_boot=3000, seed=0)
    monkeypatch.setattr(stats, "_MAX_DRAWS_PER_CHUNK", 1000)
    chunked = hierarchical_bootstrap(data, n_boot=3000, seed=0)
    assert chunked.value == whole.value
    # Different random streams, same distribution: interval ends agree to Monte Carlo error.
    assert chunked.lo == pytest.approx(whole.lo, abs=0.1)
    assert chunked.hi == pytest.approx(whole.hi, abs=0.1)


def test_coverage_on_known_hierarchical_model() -> None:
    rng = np.random.default_rng(123)
    true_mean, n_sets, covered = 0.3, 200, 0
    for k in range(n_sets):
        group_means = rng.normal(true_mean, 0.5, size=20)
        data = [rng.normal(m, 1.0, size=5) for m in group_means]
        est = hierarchical_bootstrap(data, n_boot=400, seed=k)
        covered += est.lo <= true_mean <= est.hi
    assert 0.85 <= covered / n_sets <= 1.0


def test_estimate_to_dict() -> None:
    est = Estimate(0.5, 0.4, 0.6, 3, 30)
    assert est.to_dict() == {
        "value": 0.5,
        "lo": 0.4,
        "hi": 0.6,
        "n_groups": 3,
        "n_obs": 30,
        "n_dropped": 0,
    }


# --- bootstrap difference -------------------------------------------------------------------


def test_paired_diff_removes_shared_group_effects() -> None:
    rng = np.random.default_rng(7)
    base = rng.normal(0, 2.0, size=40)  # large question-level differences shared by a and b
    a = {f"q{i}": [m + 0.2] * 4 for i, m in enumerate(base)}
    b = {f"q{i}": [m] * 4 for i, m in enumerate(base)}
    paired = bootstrap_diff(a, b, paired=True, n_boot=1000)
    unpaired = bootstrap_diff(a, b, paired=False, n_boot=1000)
    assert paired.value == pytest.approx(0.2)
    assert paired.lo == pytest.approx(0.2) and paired.hi == pytest.approx(0.2)
    assert unpaired.value == pytest.approx(0.2)
    assert unpaired.hi - unpaired.lo > 0.5
    assert paired.n_groups == 40 and unpaired.n_groups == 80
    assert paired.n_obs == 320


def test_paired_diff_rates_and_interval_contains_truth() -> None:
    rng = np.random.default_rng(8)
    p = rng.uniform(0.1, 0.6, size=60)
    a = [list((rng.random(10) < pi + 0.2).astype(float)) for pi in p]
    b = [list((rng.random(10) < pi).astype(float)) for pi in p]
    est = bootstrap_diff(a, b, n_boot=1000)
    assert est.lo < est.value < est.hi
    assert est.lo < 0.2 < est.hi


def test_paired_diff_checks_groups_and_drops_unpaired_nan_groups() -> None:
    with pytest.raises(ValueError, match="same groups"):
        bootstrap_diff({"a": [1.0]}, {"b": [1.0]})
    a = {"q1": [1.0, 1.0], "q2": [math.nan], "q3": [1.0]}
    b = {"q1": [0.0, 0.0], "q2": [0.0, 1.0], "q3": [0.0]}
    est = bootstrap_diff(a, b, n_boot=100)
    assert est.n_groups == 2
    assert est.n_dropped == 3  # q2 on both sides
    assert est.value == pytest.approx(1.0)


# --- d' -------------------------------------------------------------------------------------


def test_d_prime_hand_computed() -> None:
    res = d_prime(hits=80, misses=20, false_alarms=20, correct_rejections=80)
    assert res.tpr == pytest.approx(0.8) and res.fpr == pytest.approx(0.2)
    assert res.d_prime == pytest.approx(1.683, abs=1e-3)
    assert res.accuracy == pytest.approx(0.8)
    assert res.n == 200


def test_d_prime_clip_case() -> None:
    res = d_prime(hits=10, misses=0, false_alarms=0, correct_rejections=10)
    assert (res.tpr, res.fpr) == (1.0, 0.0)
    assert (res.tpr_clipped, res.fpr_clipped) == (0.99, 0.01)
    assert res.d_prime == pytest.approx(4.653, abs=1e-3)
    assert d_prime(0, 10, 10, 0).d_prime == pytest.approx(-4.653, abs=1e-3)
    assert "0.01" in D_PRIME_CLIP_RULE and "0.99" in D_PRIME_CLIP_RULE


def test_d_prime_rejects_missing_trials() -> None:
    with pytest.raises(ValueError, match="signal and noise"):
        d_prime(0, 0, 3, 4)
    with pytest.raises(ValueError, match=">= 0"):
        d_prime(-1, 2, 3, 4)


# --- correlations ---------------------------------------------------------------------------


def test_pearson_matches_scipy_and_fisher_interval() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    res = pearson_ci(x, y)
    ref = sps.pearsonr(x, y)
    assert res.r == pytest.approx(ref.statistic, abs=1e-12)
    assert res.p == pytest.approx(ref.pvalue, rel=1e-9)
    z, se = math.atanh(res.r), 1 / math.sqrt(47)
    assert res.lo == pytest.approx(math.tanh(z - 1.959964 * se), abs=1e-6)
    assert res.hi == pytest.approx(math.tanh(z + 1.959964 * se), abs=1e-6)
    assert res.n == 50


def test_spearman_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(10)
    x = rng.integers(0, 6, size=40).astype(float)
    y = x + rng.integers(0, 4, size=40)
    res = spearman_ci(x, y)
    ref = sps.spearmanr(x, y)
    assert res.r == pytest.approx(ref.statistic, abs=1e-12)
    assert res.p == pytest.approx(ref.pvalue, rel=1e-9)
    se = math.sqrt(1.06 / 37)
    assert res.lo == pytest.approx(math.tanh(math.atanh(res.r) - 1.959964 * se), abs=1e-6)
    assert res.lo < res.r < res.hi


def test_correlation_drops_nan_pairs_and_rejects_bad_input() -> None:
    x = [1.0, 2.0, 3.0, 4.0, 5.0, math.nan]
    y = [2.0, 1.0, 4.0, 3.0, 6.0, 1.0]
    assert pearson_ci(x, y).n == 5
    with pytest.raises(ValueError, match="constant"):
        pearson_ci([1, 1, 1, 1, 1], [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="at least 4"):
        spearman_ci([1, 2, 3], [1, 2, 3])
    perfect = pearson_ci([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert perfect.lo == pytest.approx(1.0) and perfect.hi == pytest.approx(1.0)


# --- pairwise accuracy ----------------------------------------------------------------------


def _brute_pairwise(pred: np.ndarray, target: np.ndarray) -> float:
    good = total = 0
    for i, j in itertools.combinations(range(len(pred)), 2):
        if target[i] == target[j]:
            continue
        total += 1
        good += np.sign(pred[i] - pred[j]) == np.sign(target[i] - target[j])
    return good / total


def test_pairwise_accuracy_matches_brute_force() -> None:
    rng = np.random.default_rng(11)
    target = rng.integers(0, 5, size=60).astype(float)  # many ties in target
    pred = np.round(target + rng.normal(0, 1.5, size=60))  # some ties in pred
    assert pairwise_accuracy(pred, target) == pytest.approx(_brute_pairwise(pred, target))


def test_pairwise_accuracy_sampled_and_explicit_pairs() -> None:
    rng = np.random.default_rng(12)
    target = rng.normal(size=300)
    pred = target + rng.normal(0, 1.0, size=300)
    full = pairwise_accuracy(pred, target)
    sampled = pairwise_accuracy(pred, target, max_pairs=20_000, seed=1)
    assert sampled == pytest.approx(full, abs=0.02)
    assert sampled == pairwise_accuracy(pred, target, max_pairs=20_000, seed=1)
    assert pairwise_accuracy([1, 2, 3], [3, 2, 1], pairs=[(0, 1), (1, 2)]) == 0.0
    assert pairwise_accuracy([1, 2, 3], [1, 2, 3]) == 1.0
    with pytest.raises(ValueError, match="distinct targets"):
        pairwise_accuracy([1, 2], [5, 5])


# --- KL, sign agreement, proportions --------------------------------------------------------


def test_kl_divergence_known_values() -> None:
    p = {"a": 0.2, "b": 0.5, "c": 0.3}
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence({"x": 0.5, "y": 0.5}, {"x": 0.9, "y": 0.1}) == pytest.approx(expected)
    # Unnormalised counts are renormalised.
    assert kl_divergence({"x": 5, "y": 5}, {"x": 9, "y": 1}) == pytest.approx(expected)


def test_kl_divergence_smoothing_on_missing_keys() -> None:
    eps = 1e-3
    q_norm = {"x": 1.0 / (1.0 + eps), "y": eps / (1.0 + eps)}
    expected = 0.5 * math.log(0.5 / q_norm["x"]) + 0.5 * math.log(0.5 / q_norm["y"])
    got = kl_divergence({"x": 0.5, "y": 0.5}, {"x": 1.0}, eps=eps)
    assert got == pytest.approx(expected)
    # Keys only in q add nothing to the sum but take mass from the other q entries.
    assert kl_divergence({"x": 1.0}, {"x": 0.5, "z": 0.5}) == pytest.approx(math.log(2))


def test_sign_agreement() -> None:
    assert sign_agreement([1, -2, 3, 0], [2, -1, -3, 0]) == pytest.approx(0.75)
    assert sign_agreement([1, math.nan], [1, -1]) == 1.0
    with pytest.raises(ValueError):
        sign_agreement([1, 2], [1])


def test_proportion_ci_wilson_reference_values() -> None:
    est = proportion_ci(8, 10)
    assert est.value == pytest.approx(0.8)
    assert est.lo == pytest.approx(0.4902, abs=1e-4)
    assert est.hi == pytest.approx(0.9433, abs=1e-4)
    zero = proportion_ci(0, 10)
    assert zero.lo == 0.0 and zero.hi == pytest.approx(0.2775, abs=1e-4)
    assert proportion_ci(10, 10).hi == 1.0
    with pytest.raises(ValueError):
        proportion_ci(3, 0)


# --- library-backed statistics against independent formulas ---------------------------------


def _wilson_by_hand(k: int, n: int, ci: float) -> tuple[float, float]:
    """Wilson (1927) score interval from its closed form, independent of scipy's code path."""
    z = float(sps.norm.ppf(0.5 + ci / 2.0))
    phat = k / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (3, 7), (0, 25), (25, 25), (40, 97)])
@pytest.mark.parametrize("ci", [0.9, 0.95, 0.99])
def test_proportion_ci_equals_the_wilson_closed_form(k: int, n: int, ci: float) -> None:
    est = proportion_ci(k, n, ci=ci)
    lo, hi = _wilson_by_hand(k, n, ci)
    assert (est.lo, est.hi) == pytest.approx((lo, hi), abs=1e-12)
    assert est.value == k / n and est.n_obs == est.n_groups == n
    if k == 0:
        assert est.lo == 0.0
    if k == n:
        assert est.hi == 1.0


def test_proportion_ci_takes_integral_floats_and_rejects_fractions() -> None:
    assert proportion_ci(3.0, 7) == proportion_ci(3, 7)
    assert proportion_ci(np.int64(3), np.int64(7)) == proportion_ci(3, 7)
    with pytest.raises(ValueError, match="whole number"):
        proportion_ci(2.5, 7)
    with pytest.raises(ValueError, match=r"k must be in \[0, n\]"):
        proportion_ci(8, 7)


@pytest.mark.parametrize("n", [4, 5, 12, 200])
def test_pearson_interval_equals_fisher_z_by_hand(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    y = 0.3 * x + rng.normal(size=n)
    res = pearson_ci(x, y, ci=0.9)
    r = float(np.corrcoef(x, y)[0, 1])
    crit = float(sps.norm.ppf(0.95))
    se = 1.0 / math.sqrt(n - 3)
    assert res.r == pytest.approx(r, abs=1e-12)
    assert res.lo == pytest.approx(math.tanh(math.atanh(r) - crit * se), abs=1e-12)
    assert res.hi == pytest.approx(math.tanh(math.atanh(r) + crit * se), abs=1e-12)


def test_pearson_needs_four_pairs_and_keeps_perfect_correlation_finite() -> None:
    with pytest.raises(ValueError, match="at least 4 finite pairs, got 3"):
        pearson_ci([1, 2, 3, math.nan], [3, 1, 2, 4])
    neg = pearson_ci([1, 2, 3, 4], [8, 6, 4, 2])
    assert (neg.r, neg.lo, neg.hi) == pytest.approx((-1.0, -1.0, -1.0))


def test_kl_divergence_equals_the_sum_by_hand_with_smoothing() -> None:
    rng = np.random.default_rng(3)
    keys = [f"k{i}" for i in range(8)]
    p = dict(zip(keys, rng.random(8) * (rng.random(8) > 0.3), strict=True))
    p["k0"] = 0.7  # at least one key with mass
    q = dict(zip(keys[2:], rng.random(6) * (rng.random(6) > 0.3), strict=True))  # k0, k1 missing
    eps = 1e-4
    pa = np.array([p[k] for k in keys])
    qa = np.array([q.get(k, 0.0) for k in keys])
    qa = np.where(qa > 0, qa, eps)
    pa, qa = pa / pa.sum(), qa / qa.sum()
    want = sum(pi * math.log(pi / qi) for pi, qi in zip(pa, qa, strict=True) if pi > 0)
    assert kl_divergence(p, q, eps=eps) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="no probability mass"):
        kl_divergence({"a": 0.0}, {"a": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        kl_divergence({"a": 1.0}, {"a": -1.0})
