"""Structured nulls for criterion 3: what a non-specific direction's alignment change looks like.

The trait direction's layer-mean change delta = mean_l [mean cos(-g_to, v_l) - mean cos(-g_from,
v_l)] is set against four nulls, each giving one layer-mean delta per draw:
- independent: a fresh random unit direction at every layer (the plan's control). Averaging
  L independent draws assumes the layers are independent, which makes this null too narrow
  when the gradients of neighbouring layers are correlated;
- shared: one random unit direction used at every layer (hidden sizes match across layers),
  so the layer mean keeps whatever the gradients share across layers;
- correlated: random directions whose cosines between layers equal those of the trait
  direction (v_l . v_m), so the null has the trait direction's inter-layer structure;
- other traits: directions built with the same recipe for unrelated traits ("Respond in
  French." minus "Respond normally; do not respond in French.", ...), which share every
  by-product of the prompt template with v_trait except the trait itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llmlab.gradients import alignment


def mean_alignment(grads: np.ndarray, direction: np.ndarray) -> float:
    """Return the mean trait-ward alignment cos(-g, u) of gradient rows [N, hidden] (fp32)."""
    a = alignment(torch.from_numpy(np.ascontiguousarray(grads)), torch.from_numpy(direction))
    return float(-a.cos.mean())


def alignment_deltas(g_from: np.ndarray, g_to: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Return delta(u) = mean cos(-g_to, u) - mean cos(-g_from, u) for each row u of directions."""
    return np.array(
        [mean_alignment(g_to, u) - mean_alignment(g_from, u) for u in directions], dtype=np.float64
    )


TIE_TOLERANCE = 1e-6  # fp32 cosines agree to about this; closer deltas count as ties


def percentile_rank(value: float, null: np.ndarray, tol: float = TIE_TOLERANCE) -> float:
    """Return the percentile of value in null: 100 x (share below + half the share tied).

    Values within `tol` of each other are ties, so a change that is zero up to rounding (e.g.
    a global shrink of the gradients) lands at the 50th percentile, not at an extreme.
    """
    null = np.asarray(null, dtype=float)
    if null.size == 0:
        raise ValueError("percentile_rank: empty null distribution")
    below = float((null < value - tol).sum())
    equal = float((np.abs(null - value) <= tol).sum())
    return 100.0 * (below + 0.5 * equal) / null.size


def two_sided_p(value: float, null: np.ndarray) -> float:
    """Return the share of |null| at least |value|, counting the value itself: (1 + k) / (1 + n)."""
    null = np.asarray(null, dtype=float)
    return float((1 + (np.abs(null) >= abs(value)).sum()) / (1 + null.size))


def compare(trait: float, null: np.ndarray, threshold: float) -> dict[str, Any]:
    """Return the trait delta's standing in a random-direction distribution."""
    sd = float(null.std(ddof=1)) if null.size > 1 else 0.0
    pct = percentile_rank(trait, null)
    return {
        "trait_delta": trait,
        "random_mean": float(null.mean()),
        "random_sd": sd,
        "random_p05": float(np.quantile(null, 0.05)),
        "random_p95": float(np.quantile(null, 0.95)),
        "z": (trait - float(null.mean())) / sd if sd > 0 else None,
        "percentile": pct,
        "p_two_sided": two_sided_p(trait, null),
        "specific": pct <= threshold,
    }


def shared_random_directions(n: int, hidden: int, n_layers: int, seed: int) -> np.ndarray:
    """Return [n, L, hidden]: draw j is one random unit direction repeated at every layer."""
    rng = np.random.default_rng([seed, 1_000_003])
    r = rng.standard_normal((n, hidden))
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    return np.repeat(r[:, None, :], n_layers, axis=1).astype(np.float32)


def correlated_random_directions(n: int, trait: np.ndarray, seed: int) -> np.ndarray:
    """Return [n, L, hidden] random unit directions with the trait's inter-layer cosines.

    trait: [L, hidden] unit rows. With C = trait @ trait.T (a Gram matrix, so PSD) and
    C = A A^T, rows r = A z of iid Gaussian z [L, hidden] have E[r_l . r_m] proportional to
    C_lm; in high dimension the normalised rows' cosines concentrate on C_lm. An eigen-
    decomposition stands in for Cholesky because C may be singular (identical layers).
    """
    c = trait.astype(np.float64) @ trait.astype(np.float64).T
    w, q = np.linalg.eigh(c)
    a = q * np.sqrt(np.clip(w, 0.0, None))
    rng = np.random.default_rng([seed, 2_000_003])
    z = rng.standard_normal((n, trait.shape[0], trait.shape[1]))
    r = np.einsum("lk,nkd->nld", a, z)
    r /= np.linalg.norm(r, axis=2, keepdims=True)
    return r.astype(np.float32)


def layer_mean_deltas(g_from: np.ndarray, g_to: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Return the layer-mean alignment change for each draw of directions [n, L, hidden].

    g_from, g_to: [N, L, hidden] gradients of the two conditions at the canonical position.
    """
    per_layer = np.stack(
        [
            alignment_deltas(g_from[:, li], g_to[:, li], directions[:, li])
            for li in range(directions.shape[1])
        ],
        axis=1,
    )  # [n, L]
    return per_layer.mean(axis=1)


def structured_nulls(
    grads: np.ndarray,
    trait: np.ndarray,
    others: dict[str, np.ndarray],
    independent_null: np.ndarray,
    i_from: int,
    i_to: int,
    n_random: int,
    seed: int,
    threshold: float,
) -> dict[str, Any]:
    """Return the trait's layer-mean delta against every null, and whether it beats them all.

    grads: [C, N, L, hidden]; trait: [L, hidden]; others: {trait name: [L, hidden]};
    independent_null: the layer-mean deltas of the per-layer independent random directions.
    The trait beats a random null when its percentile is at or below the threshold, and
    the other traits when its delta is below every other trait's delta.
    """
    g_from, g_to = grads[i_from], grads[i_to]
    value = float(layer_mean_deltas(g_from, g_to, trait[None])[0])
    nulls = {
        "independent": independent_null,
        "shared": layer_mean_deltas(
            g_from, g_to, shared_random_directions(n_random, trait.shape[1], trait.shape[0], seed)
        ),
        "correlated": layer_mean_deltas(
            g_from, g_to, correlated_random_directions(n_random, trait, seed)
        ),
    }
    random = {k: {**compare(value, v, threshold)} for k, v in nulls.items()}
    other = {
        name: float(layer_mean_deltas(g_from, g_to, vec[None])[0]) for name, vec in others.items()
    }
    beats_others = bool(other) and all(value < d for d in other.values())
    return {
        "trait_delta": value,
        "random_nulls": random,
        "other_traits": other,
        "beats_random_nulls": all(r["specific"] for r in random.values()),
        "beats_other_traits": beats_others,
        "worst_percentile": max(r["percentile"] for r in random.values()),
        "pass": all(r["specific"] for r in random.values()) and beats_others,
    }
