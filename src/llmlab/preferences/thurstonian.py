"""Thurstonian utilities from pairwise choice probabilities.

Model: U_i ~ N(mu_i, sigma_i^2) and P(i > j) = Phi((mu_i - mu_j) / sqrt(sigma_i^2 + sigma_j^2)).
The fit minimises the weighted binary cross-entropy between Phi(z) and the observed soft labels
P, with log-sigma bounded and weak Gaussian priors on mu and on log-sigma (they fix the scale
the likelihood leaves free and keep a task that wins every comparison finite). Two
optimisers: scipy L-BFGS-B with the analytic gradient (default) or torch Adam. Afterwards mu is normalised to mean 0 / std 1 and sigma is scaled by the same
factor, so utilities of different runs share a scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, special
from scipy.stats import spearmanr

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class Edges:
    """Observed comparisons: P(i > j) for item index pairs, with a weight per edge."""

    i: np.ndarray
    j: np.ndarray
    p: np.ndarray
    w: np.ndarray

    @classmethod
    def from_lists(
        cls,
        i: Sequence[int],
        j: Sequence[int],
        p: Sequence[float],
        w: Sequence[float] | None = None,
    ) -> Edges:
        """Return validated edges (p in [0, 1], i != j, weights positive)."""
        ia, ja = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
        pa = np.asarray(p, dtype=float)
        wa = np.ones_like(pa) if w is None else np.asarray(w, dtype=float)
        if not (ia.shape == ja.shape == pa.shape == wa.shape):
            raise ValueError("edge arrays differ in length")
        if np.any(ia == ja):
            raise ValueError("an edge compares an item with itself")
        if np.any((pa < 0) | (pa > 1)) or not np.all(np.isfinite(pa)):
            raise ValueError("edge probabilities must lie in [0, 1]")
        if np.any(wa <= 0):
            raise ValueError("edge weights must be positive")
        return cls(ia, ja, pa, wa)

    def __len__(self) -> int:
        return int(self.i.size)

    def subset(self, mask: np.ndarray) -> Edges:
        """Return the edges selected by a boolean mask or index array."""
        return Edges(self.i[mask], self.j[mask], self.p[mask], self.w[mask])


@dataclass(frozen=True)
class Fit:
    """Fitted utilities (normalised) with the optimiser's report."""

    mu: np.ndarray
    sigma: np.ndarray
    loss: float  # mean weighted BCE on the fitted edges
    converged: bool
    n_iter: int
    raw: np.ndarray  # unnormalised parameters [mu, log_sigma], for warm starts

    def prob(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Return the model's P(i > j) for index arrays."""
        s = np.sqrt(self.sigma[i] ** 2 + self.sigma[j] ** 2)
        return special.ndtr((self.mu[i] - self.mu[j]) / s)


def _loss_grad(theta: np.ndarray, e: Edges, n: int, prior: float) -> tuple[float, np.ndarray]:
    """Return the weighted BCE (+ prior) and its gradient w.r.t. [mu, log_sigma]."""
    mu, ls = theta[:n], theta[n:]
    var = np.exp(2 * ls)
    s2 = var[e.i] + var[e.j]
    s = np.sqrt(s2)
    d = mu[e.i] - mu[e.j]
    z = d / s
    lp, lq = special.log_ndtr(z), special.log_ndtr(-z)
    wsum = e.w.sum()
    loss = -np.sum(e.w * (e.p * lp + (1 - e.p) * lq)) / wsum
    logpdf = -0.5 * z * z - _LOG_SQRT_2PI
    # d/dz of -[p log Phi(z) + (1-p) log Phi(-z)], in a form stable in both tails.
    dz = -(e.p * np.exp(logpdf - lp) - (1 - e.p) * np.exp(logpdf - lq)) * e.w / wsum
    g_mu = np.bincount(e.i, dz / s, n) - np.bincount(e.j, dz / s, n)
    # dz/dlog(sigma_i) = -z * sigma_i^2 / s^2
    g_ls = np.bincount(e.i, -dz * z * var[e.i] / s2, n) + np.bincount(
        e.j, -dz * z * var[e.j] / s2, n
    )
    # Priors on mu and on log-sigma: the likelihood is unchanged when mu and sigma scale
    # together, so the log-sigma prior fixes that scale and the mu prior keeps items that win
    # (or lose) every comparison finite.
    loss += 0.5 * prior * (np.sum(mu**2) + np.sum(ls**2)) / n
    g_mu = g_mu + prior * mu / n
    g_ls = g_ls + prior * ls / n
    return float(loss), np.concatenate([g_mu, g_ls])


def _normalise(theta: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = theta[:n], np.exp(theta[n:])
    sd = mu.std()
    scale = sd if sd > 1e-12 else 1.0
    return (mu - mu.mean()) / scale, sigma / scale


def fit_thurstonian(
    n_items: int,
    edges: Edges,
    *,
    method: str = "lbfgs",
    max_iter: int = 1000,
    log_sigma_bounds: tuple[float, float] = (-3.0, 2.0),
    prior: float = 0.01,
    lr: float = 0.05,
    init: np.ndarray | None = None,
    seed: int = 0,
) -> Fit:
    """Return the Thurstonian fit of `n_items` items from `edges`.

    method "lbfgs": scipy L-BFGS-B, analytic gradient, bounds on log-sigma.
    method "adam": torch Adam for `max_iter` steps at learning rate `lr`, log-sigma clamped.
    `init` warm-starts from a previous Fit.raw of the same items.
    """
    if n_items < 2:
        raise ValueError(f"a Thurstonian fit needs at least 2 items, got {n_items}")
    if len(edges) == 0:
        raise ValueError("a Thurstonian fit needs at least one edge")
    if edges.i.max() >= n_items or edges.j.max() >= n_items or edges.i.min() < 0:
        raise ValueError("edge index out of range")
    lo, hi = log_sigma_bounds
    if init is not None and init.shape == (2 * n_items,):
        theta0 = init.astype(float).copy()
        theta0[n_items:] = np.clip(theta0[n_items:], lo, hi)
    else:
        rng = np.random.default_rng(seed)
        theta0 = np.concatenate([rng.normal(0, 0.01, n_items), np.zeros(n_items)])
    if method == "lbfgs":
        bounds = [(None, None)] * n_items + [(lo, hi)] * n_items
        res = optimize.minimize(
            _loss_grad,
            theta0,
            args=(edges, n_items, prior),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": max_iter},
        )
        theta, converged, n_iter = res.x, bool(res.success), int(res.nit)
    elif method == "adam":
        theta, n_iter = _adam(theta0, edges, n_items, prior, lr, max_iter, (lo, hi)), max_iter
        converged = True
    else:
        raise ValueError(f"unknown fit method {method!r} (use 'lbfgs' or 'adam')")
    mu, sigma = _normalise(theta, n_items)
    loss, _ = _loss_grad(theta, edges, n_items, 0.0)
    return Fit(mu, sigma, loss, converged, n_iter, theta)


def _adam(
    theta0: np.ndarray,
    e: Edges,
    n: int,
    prior: float,
    lr: float,
    steps: int,
    bounds: tuple[float, float],
) -> np.ndarray:
    """Return parameters after `steps` torch Adam steps on the same objective."""
    import torch

    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    i, j = torch.as_tensor(e.i), torch.as_tensor(e.j)
    p, w = torch.as_tensor(e.p), torch.as_tensor(e.w)
    opt = torch.optim.Adam([theta], lr=lr)
    normal = torch.distributions.Normal(0.0, 1.0)
    for _ in range(steps):
        opt.zero_grad()
        mu, ls = theta[:n], theta[n:]
        s = torch.sqrt(torch.exp(2 * ls[i]) + torch.exp(2 * ls[j]))
        z = (mu[i] - mu[j]) / s
        q = normal.cdf(z).clamp(1e-9, 1 - 1e-9)
        loss = -(w * (p * q.log() + (1 - p) * (1 - q).log())).sum() / w.sum()
        loss = loss + 0.5 * prior * ((mu**2).sum() + (ls**2).sum()) / n
        loss.backward()
        opt.step()
        with torch.no_grad():
            theta[n:].clamp_(*bounds)
    return theta.detach().numpy()


def edge_metrics(fit: Fit, edges: Edges) -> dict[str, float]:
    """Return log-loss and accuracy of the fit on edges (accuracy ignores P = 0.5 exactly)."""
    q = np.clip(fit.prob(edges.i, edges.j), 1e-9, 1 - 1e-9)
    ll = -np.sum(edges.w * (edges.p * np.log(q) + (1 - edges.p) * np.log(1 - q))) / edges.w.sum()
    decided = edges.p != 0.5
    acc = (
        float(np.mean((q[decided] > 0.5) == (edges.p[decided] > 0.5)))
        if decided.any()
        else math.nan
    )
    return {"log_loss": float(ll), "accuracy": acc, "n_edges": len(edges)}


def holdout_split(n_edges: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (fit mask, held-out mask) with round(frac * n) edges held out (at least 1)."""
    if not 0 < frac < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {frac}")
    n_out = max(1, round(frac * n_edges))
    if n_out >= n_edges:
        raise ValueError(f"{n_edges} edges are too few to hold {frac:.0%} out")
    rng = np.random.default_rng(seed)
    out = np.zeros(n_edges, dtype=bool)
    out[rng.choice(n_edges, n_out, replace=False)] = True
    return ~out, out


def split_half_reliability(n_items: int, edges: Edges, n_splits: int = 5, **fit_kw: Any) -> float:
    """Return the Spearman-Brown corrected split-half correlation of fitted mu.

    Edges are split at random into halves, each half is fitted on its own and the two mu
    vectors are correlated (Pearson); the mean over `n_splits` splits is stepped up to the
    full edge count with 2r / (1 + r). Its square root is the noise ceiling for the
    correlation of any predictor with the fitted utilities.
    """
    rng = np.random.default_rng(int(fit_kw.get("seed", 0)))
    rs = []
    for _ in range(n_splits):
        half = rng.permutation(len(edges)) < len(edges) // 2
        a = fit_thurstonian(n_items, edges.subset(half), **fit_kw)
        b = fit_thurstonian(n_items, edges.subset(~half), **fit_kw)
        rs.append(float(np.corrcoef(a.mu, b.mu)[0, 1]))
    r = float(np.mean(rs))
    return 2 * r / (1 + r) if r > -1 else math.nan


def rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Return Spearman's rank correlation of two utility vectors."""
    return float(spearmanr(a, b).statistic)
