"""Active learning of comparison pairs (protocol: preferences, active learning rule).

Start from a random 2-regular graph (a random cycle through all items); each round, among
unsampled pairs, take those in the bottom 10% of |mu_i - mu_j| AND the bottom 20% of
degree_i + degree_j, sample a batch from them (both quantiles widened 1.5x, up to 5 times,
when too few qualify; then filled at random), measure, refit. Stop at the edge budget or when
the Spearman correlation between successive fits exceeds the convergence threshold.

The measurement is a callback, so the same loop runs against a model or a synthetic oracle.
For large item sets the unsampled pairs are a random sample of `max_candidates` pairs per round
rather than all n(n-1)/2 of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from llmlab.preferences.thurstonian import Edges, Fit, fit_thurstonian, rank_corr

Measure = Callable[[list[tuple[int, int]]], Sequence[float]]


@dataclass(frozen=True)
class ActiveConfig:
    """Knobs of the active-learning loop."""

    batch_size: int
    edge_budget: int
    convergence_threshold: float
    mu_quantile: float = 0.10
    degree_quantile: float = 0.20
    widen: float = 1.5
    max_widen: int = 5
    max_candidates: int = 2_000_000
    fit_kw: dict[str, object] = field(default_factory=dict)


@dataclass
class ActiveResult:
    """Measured edges in measurement order, the final fit and one row per round."""

    pairs: list[tuple[int, int]]
    probs: list[float]
    rounds: list[int]
    fit: Fit
    history: list[dict[str, float]]
    stopped: str


def edge_budget(n_items: int, factor: float) -> int:
    """Return the protocol's edge target factor * N * log2(N) (at least N, at most all pairs)."""
    total = n_items * (n_items - 1) // 2
    return int(min(total, max(n_items, round(factor * n_items * math.log2(max(n_items, 2))))))


def initial_pairs(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Return the edges of a random 2-regular graph on n >= 3 items (a random cycle)."""
    if n < 3:
        raise ValueError(f"active learning needs at least 3 items, got {n}")
    perm = [int(v) for v in rng.permutation(n)]
    return [(min(a, b), max(a, b)) for a, b in zip(perm, perm[1:] + perm[:1], strict=True)]


def unsampled_pairs(
    n: int, seen: set[tuple[int, int]], cap: int, rng: np.random.Generator
) -> np.ndarray:
    """Return unsampled pairs [m, 2] (i < j): all of them, or a random sample of `cap`."""
    total = n * (n - 1) // 2
    if total <= cap:
        i, j = np.triu_indices(n, k=1)
        pairs = np.stack([i, j], axis=1)
    else:
        a = rng.integers(0, n, size=cap)
        b = (a + rng.integers(1, n, size=cap)) % n
        pairs = np.unique(np.sort(np.stack([a, b], axis=1), axis=1), axis=0)
    if seen:
        keys = pairs[:, 0].astype(np.int64) * n + pairs[:, 1]
        seen_keys = np.fromiter((i * n + j for i, j in seen), dtype=np.int64, count=len(seen))
        pairs = pairs[~np.isin(keys, seen_keys)]
    return pairs


def select_pairs(
    mu: np.ndarray,
    degree: np.ndarray,
    seen: set[tuple[int, int]],
    k: int,
    cfg: ActiveConfig,
    rng: np.random.Generator,
) -> list[tuple[int, int]]:
    """Return up to k new pairs by the protocol's closeness-and-low-degree rule."""
    cand = unsampled_pairs(mu.size, seen, cfg.max_candidates, rng)
    if cand.size == 0 or k <= 0:
        return []
    gap = np.abs(mu[cand[:, 0]] - mu[cand[:, 1]])
    deg = degree[cand[:, 0]] + degree[cand[:, 1]]
    qm, qd = cfg.mu_quantile, cfg.degree_quantile
    chosen = np.empty(0, dtype=np.int64)
    for _ in range(cfg.max_widen + 1):
        ok = (gap <= np.quantile(gap, min(qm, 1.0))) & (deg <= np.quantile(deg, min(qd, 1.0)))
        chosen = np.flatnonzero(ok)
        if chosen.size >= k or (qm >= 1 and qd >= 1):
            break
        qm, qd = qm * cfg.widen, qd * cfg.widen
    if chosen.size >= k:
        pick = rng.choice(chosen, size=k, replace=False)
    else:
        rest = np.setdiff1d(np.arange(len(cand)), chosen)
        fill = rng.choice(rest, size=min(k - chosen.size, rest.size), replace=False)
        pick = np.concatenate([chosen, fill])
    return [(int(cand[p, 0]), int(cand[p, 1])) for p in pick]


def run_active(
    n: int,
    measure: Measure,
    cfg: ActiveConfig,
    seed: int = 0,
    random_pairs: bool = False,
    log: Callable[[str], None] | None = None,
) -> ActiveResult:
    """Return the measured edges and fit of an active-learning run over n items.

    `measure(pairs)` returns P(i > j) per pair. With `random_pairs` the selection rule is
    replaced by uniform sampling of unsampled pairs (the comparison arm of the benchmark).
    """
    rng = np.random.default_rng(seed)
    pairs = initial_pairs(n, rng)[: cfg.edge_budget]
    probs = list(measure(pairs))
    rounds = [0] * len(pairs)
    seen = set(pairs)
    fit = _fit(n, pairs, probs, cfg, None)
    history = [{"round": 0, "n_edges": len(pairs), "rank_corr_prev": math.nan, "loss": fit.loss}]
    stopped = "budget"
    r = 0
    while len(pairs) < cfg.edge_budget:
        r += 1
        k = min(cfg.batch_size, cfg.edge_budget - len(pairs))
        if random_pairs:
            cand = unsampled_pairs(n, seen, cfg.max_candidates, rng)
            idx = rng.choice(len(cand), size=min(k, len(cand)), replace=False) if len(cand) else []
            new = [(int(cand[p, 0]), int(cand[p, 1])) for p in idx]
        else:
            degree = np.bincount(np.array(pairs).ravel(), minlength=n)
            new = select_pairs(fit.mu, degree, seen, k, cfg, rng)
        if not new:
            stopped = "exhausted"
            break
        probs.extend(measure(new))
        pairs.extend(new)
        rounds.extend([r] * len(new))
        seen.update(new)
        prev = fit
        fit = _fit(n, pairs, probs, cfg, prev)
        rc = rank_corr(prev.mu, fit.mu)
        history.append({"round": r, "n_edges": len(pairs), "rank_corr_prev": rc, "loss": fit.loss})
        if log:
            log(f"round {r}: {len(pairs)} edges, rank corr with previous fit {rc:.4f}")
        if rc > cfg.convergence_threshold:
            stopped = "converged"
            break
    return ActiveResult(pairs, probs, rounds, fit, history, stopped)


def _fit(
    n: int, pairs: list[tuple[int, int]], probs: list[float], cfg: ActiveConfig, prev: Fit | None
) -> Fit:
    arr = np.asarray(pairs)
    edges = Edges.from_lists(arr[:, 0], arr[:, 1], probs)
    init = prev.raw if prev is not None else None
    return fit_thurstonian(n, edges, init=init, **cfg.fit_kw)  # type: ignore[arg-type]
