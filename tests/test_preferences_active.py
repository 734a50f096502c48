"""Active learning of pairs: the protocol's selection rule and its benefit over random pairs."""

from __future__ import annotations

import numpy as np
from scipy import special

from llmlab.preferences.active import (
    ActiveConfig,
    edge_budget,
    initial_pairs,
    run_active,
    select_pairs,
)


def test_initial_graph_is_two_regular() -> None:
    pairs = initial_pairs(25, np.random.default_rng(0))
    deg = np.bincount(np.array(pairs).ravel(), minlength=25)
    assert len(pairs) == 25 and len(set(pairs)) == 25
    assert np.all(deg == 2)


def test_edge_budget_formula() -> None:
    assert edge_budget(1024, 2.0) == 2 * 1024 * 10
    assert edge_budget(10, 100.0) == 45  # capped at all pairs
    assert edge_budget(64, 0.01) == 64  # at least one edge per item


def test_selection_prefers_close_and_rarely_compared_pairs() -> None:
    rng = np.random.default_rng(0)
    n = 200
    mu = np.sort(rng.normal(size=n))
    degree = np.where(np.arange(n) < 100, 1, 12)
    cfg = ActiveConfig(batch_size=20, edge_budget=10_000, convergence_threshold=1.0)
    picked = select_pairs(mu, degree, set(), 20, cfg, rng)
    assert len(picked) == 20 and len(set(picked)) == 20
    gaps = np.array([abs(mu[i] - mu[j]) for i, j in picked])
    all_gaps = np.abs(mu[:, None] - mu[None, :])[np.triu_indices(n, 1)]
    assert gaps.max() <= np.quantile(all_gaps, 0.10) + 1e-12
    assert all(degree[i] + degree[j] <= 13 for i, j in picked)


def test_selection_skips_measured_pairs_and_fills_when_short() -> None:
    rng = np.random.default_rng(1)
    mu = np.zeros(6)
    seen = {(0, 1), (0, 2), (1, 2)}
    cfg = ActiveConfig(batch_size=12, edge_budget=15, convergence_threshold=1.0)
    picked = select_pairs(mu, np.zeros(6, dtype=int), seen, 12, cfg, rng)
    assert len(picked) == 12 and not set(picked) & seen


def _oracle(mu: np.ndarray, sigma: np.ndarray, samples: int, seed: int):
    rng = np.random.default_rng(seed)

    def measure(pairs):
        a = np.array(pairs)
        q = special.ndtr((mu[a[:, 0]] - mu[a[:, 1]]) / np.hypot(sigma[a[:, 0]], sigma[a[:, 1]]))
        return (rng.binomial(samples, q) / samples).tolist()

    return measure


def heldout_accuracy(mu_hat: np.ndarray, mu: np.ndarray, seed: int = 99) -> float:
    """Return how often fitted utilities order random held-out pairs like the true ones."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, mu.size, 4000)
    j = (i + rng.integers(1, mu.size, 4000)) % mu.size
    return float(np.mean((mu_hat[i] > mu_hat[j]) == (mu[i] > mu[j])))


def test_active_reaches_random_accuracy_with_fewer_comparisons() -> None:
    rng = np.random.default_rng(5)
    n = 80
    mu, sigma = rng.normal(size=n), np.full(n, 0.3)
    random_acc, active_acc = [], []
    for seed in range(2):
        cfg = ActiveConfig(batch_size=80, edge_budget=640, convergence_threshold=1.1)
        rnd = run_active(n, _oracle(mu, sigma, 6, seed), cfg, seed=seed, random_pairs=True)
        random_acc.append(heldout_accuracy(rnd.fit.mu, mu))
        cfg_al = ActiveConfig(batch_size=60, edge_budget=440, convergence_threshold=1.1)
        al = run_active(n, _oracle(mu, sigma, 6, seed), cfg_al, seed=seed)
        assert len(al.pairs) == 440 and al.stopped == "budget"
        active_acc.append(heldout_accuracy(al.fit.mu, mu))
    # 440 actively chosen comparisons match 640 random ones.
    assert np.mean(active_acc) >= np.mean(random_acc) - 0.002, (active_acc, random_acc)


def test_convergence_stops_early() -> None:
    rng = np.random.default_rng(2)
    mu = rng.normal(size=30)
    cfg = ActiveConfig(batch_size=15, edge_budget=400, convergence_threshold=0.9)
    res = run_active(30, _oracle(mu, np.full(30, 0.3), 50, 0), cfg, seed=0)
    assert res.stopped == "converged" and len(res.pairs) < 400
    assert res.history[-1]["rank_corr_prev"] > 0.9
