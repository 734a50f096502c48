"""Thurstonian fit: gradient, recovery of known utilities, held-out metrics, reliability."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, special

from llmlab.preferences.thurstonian import (
    Edges,
    _loss_grad,
    edge_metrics,
    fit_thurstonian,
    holdout_split,
    rank_corr,
    split_half_reliability,
)


def synthetic(n: int, n_edges: int, seed: int, samples: int | None = None):
    """Return (true mu, edges) with P from the Thurstonian model (sampled when `samples`)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=n)
    sigma = rng.uniform(0.3, 0.8, size=n)
    i = rng.integers(0, n, n_edges)
    j = (i + rng.integers(1, n, n_edges)) % n
    p = special.ndtr((mu[i] - mu[j]) / np.sqrt(sigma[i] ** 2 + sigma[j] ** 2))
    if samples:
        p = rng.binomial(samples, p) / samples
    return mu, Edges.from_lists(i, j, p)


def test_gradient_matches_finite_differences() -> None:
    _, e = synthetic(30, 200, 0)
    theta = np.random.default_rng(1).normal(scale=0.3, size=60)
    err = optimize.check_grad(
        lambda t: _loss_grad(t, e, 30, 0.05)[0], lambda t: _loss_grad(t, e, 30, 0.05)[1], theta
    )
    assert err < 1e-5


@pytest.mark.parametrize("method", ["lbfgs", "adam"])
def test_recovers_known_utilities(method: str) -> None:
    mu, e = synthetic(60, 900, 2, samples=10)
    steps = {"adam": 250, "lbfgs": 1000}[method]
    fit = fit_thurstonian(60, e, method=method, max_iter=steps, lr=0.1)
    assert rank_corr(fit.mu, mu) > 0.95
    assert abs(fit.mu.mean()) < 1e-9 and abs(fit.mu.std() - 1) < 1e-9
    assert np.all(fit.sigma > 0)


def test_heldout_metrics_beat_chance() -> None:
    mu, e = synthetic(50, 800, 3, samples=10)
    keep, held = holdout_split(len(e), 0.05, seed=0)
    assert held.sum() == 40 and not (keep & held).any()
    fit = fit_thurstonian(50, e.subset(keep))
    m = edge_metrics(fit, e.subset(held))
    assert m["log_loss"] < math.log(2)
    assert m["accuracy"] > 0.75
    assert m["n_edges"] == 40


def test_warm_start_and_unbeatable_item_stay_finite() -> None:
    e = Edges.from_lists([0, 0, 1, 2], [1, 2, 2, 3], [1.0, 1.0, 0.7, 0.4])
    fit = fit_thurstonian(4, e)
    assert np.all(np.isfinite(fit.mu)) and fit.mu[0] == fit.mu.max()
    again = fit_thurstonian(4, e, init=fit.raw)
    assert rank_corr(again.mu, fit.mu) > 0.99


def test_split_half_reliability_tracks_data_quality() -> None:
    _, dense = synthetic(30, 400, 4, samples=20)
    _, sparse = synthetic(30, 60, 4, samples=1)
    good = split_half_reliability(30, dense, 2)
    assert good > 0.9
    assert good > split_half_reliability(30, sparse, 2)


def test_bad_edges_rejected() -> None:
    with pytest.raises(ValueError, match="itself"):
        Edges.from_lists([0], [0], [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Edges.from_lists([0], [1], [1.5])
    with pytest.raises(ValueError, match="method"):
        fit_thurstonian(2, Edges.from_lists([0], [1], [0.5]), method="newton")
