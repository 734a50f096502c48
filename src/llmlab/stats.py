"""Statistics shared by every experiment family: bootstrap CIs, d', correlations, rates.

Conventions used throughout:
- An observation that could not be scored is NaN; NaNs are dropped before any statistic is
  computed and the number dropped is reported where the result type has room for it.
- Resampling uses `numpy.random.default_rng(seed)`, so every interval is reproducible.
- Intervals are two-sided at level `ci` (0.95 by default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

GroupedValues = Mapping[str, Sequence[float]] | Sequence[Sequence[float]]

STATISTICS = ("mean", "group_mean")

D_PRIME_CLIP = (0.01, 0.99)
D_PRIME_CLIP_RULE = (
    "d' = Phi^-1(TPR) - Phi^-1(FPR), with TPR and FPR clipped to [0.01, 0.99] before the "
    "inverse normal CDF is applied, so |d'| is at most 4.65 and perfect or empty cells stay finite."
)

# Upper bound on the number of resampled observations held in memory at once; bootstrap
# replicates are processed in chunks below this size.
_MAX_DRAWS_PER_CHUNK = 4_000_000


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided interval and the sample sizes behind it."""

    value: float
    lo: float
    hi: float
    n_groups: int
    n_obs: int
    n_dropped: int = 0  # NaN (unscorable) observations removed before estimation

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class DPrime:
    """Signal-detection summary of a yes/no detection task."""

    tpr: float
    fpr: float
    tpr_clipped: float
    fpr_clipped: float
    d_prime: float
    accuracy: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Correlation:
    """A correlation coefficient with its Fisher-z interval and two-sided p-value."""

    r: float
    lo: float
    hi: float
    p: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain JSON-ready dict."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Hierarchical bootstrap
#
# Hand-written: scipy.stats.bootstrap resamples one level (observations, or paired rows), while
# these resample groups and then observations inside each chosen group (and, in the crossed
# version, seeds and prompts independently), which no scipy or statsmodels routine does.


@dataclass(frozen=True)
class _Flat:
    """Ragged groups packed into one array: group g is values[starts[g]:starts[g] + sizes[g]]."""

    keys: tuple[str, ...]
    values: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    n_dropped: int


def _as_mapping(values_by_group: GroupedValues, name: str) -> dict[str, np.ndarray]:
    """Return {group key: float array}; sequence input is keyed by position ('0', '1', ...)."""
    if isinstance(values_by_group, Mapping):
        items = [(str(k), v) for k, v in values_by_group.items()]
    elif isinstance(values_by_group, (str, bytes)):
        raise TypeError(f"{name}: expected a mapping or a sequence of sequences of numbers")
    else:
        items = [(str(i), v) for i, v in enumerate(values_by_group)]
    out: dict[str, np.ndarray] = {}
    for key, vals in items:
        arr = np.asarray(vals, dtype=float)
        if arr.ndim == 0:
            raise TypeError(f"{name}: group {key!r} is a scalar; every group must be a sequence")
        out[key] = arr.ravel()
    return out


def _flatten(groups: Mapping[str, np.ndarray], keys: Sequence[str]) -> _Flat:
    """Return the groups in `keys` order packed into one array, NaNs removed and counted."""
    kept: list[np.ndarray] = []
    n_dropped = 0
    for key in keys:
        arr = groups[key]
        ok = ~np.isnan(arr)
        n_dropped += int(arr.size - ok.sum())
        kept.append(arr[ok])
    sizes = np.array([a.size for a in kept], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    values = np.concatenate(kept) if kept else np.empty(0)
    return _Flat(tuple(keys), values, starts, sizes, n_dropped)


def _prepare(values_by_group: GroupedValues, name: str) -> _Flat:
    """Return the non-empty groups of one input packed for resampling; raise if none remain."""
    groups = _as_mapping(values_by_group, name)
    if not groups:
        raise ValueError(f"{name}: no groups given; the bootstrap needs at least one group")
    total_dropped = sum(int(np.isnan(a).sum()) for a in groups.values())
    keys = [k for k, a in groups.items() if (~np.isnan(a)).any()]
    if not keys:
        raise ValueError(
            f"{name}: every observation is NaN or every group is empty; nothing to estimate"
        )
    flat = _flatten(groups, keys)
    return _Flat(flat.keys, flat.values, flat.starts, flat.sizes, total_dropped)


def _point(flat: _Flat, statistic: str) -> float:
    """Return the statistic on the observed (not resampled) data."""
    if statistic == "mean":
        return float(flat.values.mean())
    sums = np.add.reduceat(flat.values, flat.starts)
    return float((sums / flat.sizes).mean())


def _resampled_stat(
    flat: _Flat, chosen: np.ndarray, rng: np.random.Generator, statistic: str
) -> np.ndarray:
    """Return one statistic per row of `chosen` (bootstrap replicates x resampled groups).

    Each chosen group contributes as many draws (with replacement) from its own observations
    as it has observations, so the whole two-level resample is one vectorised gather.
    """
    n_rep, n_slots = chosen.shape
    sizes = flat.sizes[chosen]  # (n_rep, n_slots)
    flat_groups = np.repeat(chosen.ravel(), sizes.ravel())
    u = rng.random(flat_groups.size)
    within = (u * flat.sizes[flat_groups]).astype(np.int64)
    draws = flat.values[flat.starts[flat_groups] + within]
    if statistic == "mean":
        rep_of_draw = np.repeat(np.arange(n_rep), sizes.sum(axis=1))
        sums = np.bincount(rep_of_draw, weights=draws, minlength=n_rep)
        return sums / sizes.sum(axis=1)
    slot_of_draw = np.repeat(np.arange(n_rep * n_slots), sizes.ravel())
    slot_sums = np.bincount(slot_of_draw, weights=draws, minlength=n_rep * n_slots)
    return (slot_sums / sizes.ravel()).reshape(n_rep, n_slots).mean(axis=1)


def _check_args(n_boot: int, ci: float, statistic: str) -> None:
    """Raise ValueError on an unusable bootstrap configuration."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")


def _chunk_size(n_boot: int, n_draws_per_rep: int) -> int:
    """Return how many replicates to resample at once while staying under the memory cap."""
    return max(1, min(n_boot, _MAX_DRAWS_PER_CHUNK // max(1, n_draws_per_rep)))


def _interval(reps: np.ndarray, ci: float) -> tuple[float, float]:
    """Return the percentile interval of the bootstrap replicates."""
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def hierarchical_bootstrap(
    values_by_group: GroupedValues,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    statistic: str = "mean",
) -> Estimate:
    """Return the point estimate and two-level percentile bootstrap interval of grouped data.

    Groups are typically questions and observations the repeated samples scored on each.
    Every replicate resamples groups with replacement, then, inside each chosen group,
    resamples that group's observations with replacement (as many as it has), so the
    interval reflects both between-question and within-question variation.

    statistic:
      "mean"        pooled mean of all (resampled) observations; groups weigh by their size.
                    The point estimate is the pooled mean of the observed data, not the mean
                    of group means, so it equals the plain rate over all scored samples.
      "group_mean"  mean of per-group means; every group weighs the same.

    NaN observations (unscorable) are dropped first and counted in `n_dropped`; a group with
    no observation left is left out of `n_groups`. Raises ValueError on empty input.
    """
    _check_args(n_boot, ci, statistic)
    flat = _prepare(values_by_group, "values_by_group")
    rng = np.random.default_rng(seed)
    n_groups = len(flat.keys)
    reps = np.empty(n_boot)
    step = _chunk_size(n_boot, int(flat.sizes.sum()))
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        chosen = rng.integers(0, n_groups, size=(stop - start, n_groups))
        reps[start:stop] = _resampled_stat(flat, chosen, rng, statistic)
    lo, hi = _interval(reps, ci)
    return Estimate(
        value=_point(flat, statistic),
        lo=lo,
        hi=hi,
        n_groups=n_groups,
        n_obs=int(flat.values.size),
        n_dropped=flat.n_dropped,
    )


def bootstrap_diff(
    a_by_group: GroupedValues,
    b_by_group: GroupedValues,
    paired: bool = True,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    statistic: str = "mean",
) -> Estimate:
    """Return statistic(a) - statistic(b) with a hierarchical bootstrap interval.

    paired=True (e.g. triggered vs untriggered runs of the same questions): both inputs must
    have the same group keys (or the same number of groups, for sequence input); each
    replicate draws one set of groups and uses it for both sides, then resamples
    observations within each side independently. Groups with no non-NaN observation on
    either side are dropped from both sides. paired=False resamples the two inputs
    independently (different question sets).

    `n_groups` is the number of paired groups (paired) or the sum over both sides
    (unpaired); `n_obs` and `n_dropped` sum over both sides.
    """
    _check_args(n_boot, ci, statistic)
    rng = np.random.default_rng(seed)
    if paired:
        ga = _as_mapping(a_by_group, "a_by_group")
        gb = _as_mapping(b_by_group, "b_by_group")
        if set(ga) != set(gb):
            only_a = sorted(set(ga) - set(gb))[:5]
            only_b = sorted(set(gb) - set(ga))[:5]
            raise ValueError(
                "paired bootstrap needs the same groups on both sides; "
                f"only in a: {only_a}, only in b: {only_b}"
            )
        if not ga:
            raise ValueError("no groups given; the bootstrap needs at least one group")
        keys = [k for k in ga if (~np.isnan(ga[k])).any() and (~np.isnan(gb[k])).any()]
        if not keys:
            raise ValueError("no group has a non-NaN observation on both sides; nothing to compare")
        fa, fb = _flatten(ga, keys), _flatten(gb, keys)
        # Observations in groups dropped for lack of a partner count as dropped too.
        kept = set(keys)
        dropped = sum(int(ga[k].size + gb[k].size) for k in ga if k not in kept)
        dropped += fa.n_dropped + fb.n_dropped
        n_groups = len(keys)
        reps = np.empty(n_boot)
        step = _chunk_size(n_boot, int(fa.sizes.sum() + fb.sizes.sum()))
        for start in range(0, n_boot, step):
            stop = min(n_boot, start + step)
            chosen = rng.integers(0, n_groups, size=(stop - start, n_groups))
            reps[start:stop] = _resampled_stat(fa, chosen, rng, statistic) - _resampled_stat(
                fb, chosen, rng, statistic
            )
        total_groups = n_groups
    else:
        fa = _prepare(a_by_group, "a_by_group")
        fb = _prepare(b_by_group, "b_by_group")
        dropped = fa.n_dropped + fb.n_dropped
        na, nb = len(fa.keys), len(fb.keys)
        reps = np.empty(n_boot)
        step = _chunk_size(n_boot, int(fa.sizes.sum() + fb.sizes.sum()))
        for start in range(0, n_boot, step):
            stop = min(n_boot, start + step)
            ca = rng.integers(0, na, size=(stop - start, na))
            cb = rng.integers(0, nb, size=(stop - start, nb))
            reps[start:stop] = _resampled_stat(fa, ca, rng, statistic) - _resampled_stat(
                fb, cb, rng, statistic
            )
        total_groups = na + nb
    lo, hi = _interval(reps, ci)
    return Estimate(
        value=_point(fa, statistic) - _point(fb, statistic),
        lo=lo,
        hi=hi,
        n_groups=total_groups,
        n_obs=int(fa.values.size + fb.values.size),
        n_dropped=int(dropped),
    )


def _crossed_matrix(values: Sequence[Sequence[float]] | np.ndarray, name: str) -> np.ndarray:
    """Return a [seeds, prompts] float matrix, or raise naming the input."""
    y = np.asarray(values, dtype=float)
    if y.ndim != 2 or y.shape[0] < 1 or y.shape[1] < 1:
        raise ValueError(
            f"{name}: crossed bootstrap needs a [seeds, prompts] matrix, got {y.shape}"
        )
    if not np.isfinite(y).any():
        raise ValueError(f"{name}: no finite observation; nothing to estimate")
    return y


def _prompt_means(y: np.ndarray, seeds: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Return, per replicate and resampled prompt, the NaN-skipping mean over resampled seeds."""
    cells = y[seeds[:, :, None], prompts[:, None, :]]  # (n_rep, n_seeds, n_prompts)
    ok = np.isfinite(cells)
    n = ok.sum(axis=1)
    return np.where(n > 0, np.where(ok, cells, 0.0).sum(axis=1) / np.maximum(n, 1), np.nan)


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Return the mean of each row over its finite entries (NaN where none is finite)."""
    ok = np.isfinite(x)
    n = ok.sum(axis=-1)
    return np.where(n > 0, np.where(ok, x, 0.0).sum(axis=-1) / np.maximum(n, 1), np.nan)


def crossed_bootstrap_diff(
    a: Sequence[Sequence[float]] | np.ndarray,
    b: Sequence[Sequence[float]] | np.ndarray | None = None,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Return the mean over prompts of (seed-mean a - seed-mean b), seeds and prompts crossed.

    a, b: [seeds, prompts] matrices (one row per training seed, one column per prompt, the
    same prompts in the same order on both sides; NaN = unscorable). b=None estimates the
    mean over prompts of a's seed means. Every replicate draws the prompts with replacement
    once (shared by both sides: paired over prompts) and, independently for each side, its
    seeds with replacement, then averages over the resampled cells. Nesting seeds inside
    prompts instead lets every prompt draw its own seeds, so a seed's shift shared by all
    prompts averages out and between-seed variance barely reaches the interval. With one
    seed a side the seed draw is constant and the interval shows prompt variance only.

    A prompt with no finite cell on either side is left out (so the difference stays paired).
    `n_groups` is the number of prompts kept; `n_obs` and `n_dropped` count cells over both
    sides. Replicates left with no prompt are left out of the percentile interval.
    """
    _check_args(n_boot, ci, "mean")
    ya = _crossed_matrix(a, "a")
    yb = None if b is None else _crossed_matrix(b, "b")
    if yb is not None and yb.shape[1] != ya.shape[1]:
        raise ValueError(
            f"crossed bootstrap: a has {ya.shape[1]} prompts, b has {yb.shape[1]}; "
            "the prompts must be the same"
        )
    keep = np.isfinite(ya).any(axis=0)
    if yb is not None:
        keep &= np.isfinite(yb).any(axis=0)
    if not keep.any():
        raise ValueError("crossed bootstrap: no prompt has a finite cell on both sides")
    cells = ya.size + (0 if yb is None else yb.size)
    ya = ya[:, keep]
    yb = None if yb is None else yb[:, keep]
    rng = np.random.default_rng(seed)
    n_prompts = ya.shape[1]
    reps = np.empty(n_boot)
    step = _chunk_size(n_boot, cells)
    for start in range(0, n_boot, step):
        k = min(n_boot, start + step) - start
        prompts = rng.integers(0, n_prompts, size=(k, n_prompts))
        per_prompt = _prompt_means(ya, rng.integers(0, ya.shape[0], size=(k, ya.shape[0])), prompts)
        if yb is not None:
            per_prompt = per_prompt - _prompt_means(
                yb, rng.integers(0, yb.shape[0], size=(k, yb.shape[0])), prompts
            )
        reps[start : start + k] = _nanmean_rows(per_prompt)
    lo, hi = _interval(reps[np.isfinite(reps)], ci)
    point = _nanmean_rows(ya.T) - (0.0 if yb is None else _nanmean_rows(yb.T))
    finite = int(np.isfinite(ya).sum()) + (0 if yb is None else int(np.isfinite(yb).sum()))
    return Estimate(
        value=float(point.mean()),
        lo=lo,
        hi=hi,
        n_groups=n_prompts,
        n_obs=finite,
        n_dropped=cells - finite,
    )


# ---------------------------------------------------------------------------------------------
# Signal detection


def d_prime(
    hits: int,
    misses: int,
    false_alarms: int,
    correct_rejections: int,
    clip: tuple[float, float] = D_PRIME_CLIP,
) -> DPrime:
    """Return d' and the rates behind it for a yes/no detection task (see D_PRIME_CLIP_RULE).

    Raises ValueError when a count is negative or when there are no signal trials or no
    noise trials, since one of the two rates is then undefined.
    """
    counts = {
        "hits": hits,
        "misses": misses,
        "false_alarms": false_alarms,
        "correct_rejections": correct_rejections,
    }
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    lo, hi = clip
    if not 0.0 < lo < hi < 1.0:
        raise ValueError(f"clip must satisfy 0 < lo < hi < 1, got {clip}")
    n_signal = hits + misses
    n_noise = false_alarms + correct_rejections
    if n_signal == 0 or n_noise == 0:
        raise ValueError(
            f"d' needs signal and noise trials; got {n_signal} signal and {n_noise} noise trials"
        )
    tpr = hits / n_signal
    fpr = false_alarms / n_noise
    tpr_c = min(max(tpr, lo), hi)
    fpr_c = min(max(fpr, lo), hi)
    d = float(sps.norm.ppf(tpr_c) - sps.norm.ppf(fpr_c))
    n = n_signal + n_noise
    return DPrime(
        tpr=float(tpr),
        fpr=float(fpr),
        tpr_clipped=float(tpr_c),
        fpr_clipped=float(fpr_c),
        d_prime=d,
        accuracy=float((hits + correct_rejections) / n),
        n=int(n),
    )


# ---------------------------------------------------------------------------------------------
# Correlations


def _paired_finite(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Return x and y as float arrays with every pair holding a NaN/inf removed."""
    xa = np.asarray(x, dtype=float).ravel()
    ya = np.asarray(y, dtype=float).ravel()
    if xa.size != ya.size:
        raise ValueError(f"x and y differ in length ({xa.size} vs {ya.size})")
    ok = np.isfinite(xa) & np.isfinite(ya)
    return xa[ok], ya[ok]


def _fisher_interval(r: float, se: float, ci: float) -> tuple[float, float]:
    """Return the interval tanh(atanh(r) +/- z * se).

    Used for Spearman's rho only: scipy's spearmanr result has no confidence interval, and
    the Bonett-Wright variance below is not among its options (Pearson's uses scipy's).
    """
    if abs(r) >= 1.0:
        return float(r), float(r)
    z = math.atanh(r)
    crit = float(sps.norm.ppf(0.5 + ci / 2.0))
    return math.tanh(z - crit * se), math.tanh(z + crit * se)


def _check_corr_input(xa: np.ndarray, ya: np.ndarray, ci: float) -> None:
    """Raise ValueError when a correlation interval cannot be formed."""
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if xa.size < 4:
        raise ValueError(f"a Fisher-z interval needs at least 4 finite pairs, got {xa.size}")
    if np.ptp(xa) == 0 or np.ptp(ya) == 0:
        raise ValueError("correlation is undefined: x or y is constant")


def pearson_ci(x: Sequence[float], y: Sequence[float], ci: float = 0.95) -> Correlation:
    """Return Pearson's r with scipy's Fisher-z interval (SE 1/sqrt(n-3)) and p-value.

    Pairs where either value is NaN or infinite are dropped first; `n` counts the rest.
    Fewer than 4 pairs (the interval's SE is undefined) or a constant side raise ValueError.
    """
    xa, ya = _paired_finite(x, y)
    _check_corr_input(xa, ya, ci)
    res = sps.pearsonr(xa, ya)
    interval = res.confidence_interval(confidence_level=ci)
    return Correlation(
        r=float(res.statistic),
        lo=float(interval.low),
        hi=float(interval.high),
        p=float(res.pvalue),
        n=int(xa.size),
    )


def spearman_ci(x: Sequence[float], y: Sequence[float], ci: float = 0.95) -> Correlation:
    """Return Spearman's rho with a Fisher-z interval and scipy's p-value.

    The interval uses var(atanh(rho)) = 1.06 / (n - 3) (Bonett & Wright, 2000,
    Psychometrika 65:23-28), which corrects the Pearson 1/(n-3) for rank correlations.
    Pairs where either value is NaN or infinite are dropped first.
    """
    xa, ya = _paired_finite(x, y)
    _check_corr_input(xa, ya, ci)
    res = sps.spearmanr(xa, ya)
    r, p = float(res.statistic), float(res.pvalue)
    lo, hi = _fisher_interval(r, math.sqrt(1.06 / (xa.size - 3)), ci)
    return Correlation(r=r, lo=lo, hi=hi, p=p, n=int(xa.size))


# ---------------------------------------------------------------------------------------------
# Agreement and divergence


def pairwise_accuracy(
    pred: Sequence[float],
    target: Sequence[float],
    pairs: Sequence[tuple[int, int]] | np.ndarray | None = None,
    max_pairs: int = 200_000,
    seed: int = 0,
) -> float:
    """Return the fraction of pairs whose predicted order matches the target order.

    Only pairs with target_i != target_j count. A pair is correct when
    sign(pred_i - pred_j) == sign(target_i - target_j), so a tie in `pred` counts as wrong.
    Pairs come from `pairs` when given; otherwise all i < j pairs when n(n-1)/2 <= max_pairs,
    else `max_pairs` pairs (i != j) drawn uniformly with a seeded generator.
    Raises ValueError when no pair has distinct targets.
    """
    p = np.asarray(pred, dtype=float).ravel()
    t = np.asarray(target, dtype=float).ravel()
    if p.size != t.size:
        raise ValueError(f"pred and target differ in length ({p.size} vs {t.size})")
    n = p.size
    if pairs is not None:
        idx = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"pairs index out of range for {n} items")
        i, j = idx[:, 0], idx[:, 1]
    elif n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, size=max_pairs)
        # Offset in [1, n-1] guarantees j != i while keeping j uniform over the others.
        j = (i + rng.integers(1, n, size=max_pairs)) % n
    dt = np.sign(t[i] - t[j])
    keep = dt != 0
    if not keep.any():
        raise ValueError("no pair has distinct targets; pairwise accuracy is undefined")
    dp = np.sign(p[i] - p[j])
    return float(np.mean(dp[keep] == dt[keep]))


def kl_divergence(p: Mapping[str, float], q: Mapping[str, float], eps: float = 1e-6) -> float:
    """Return KL(P || Q) in nats over the union of the keys of p and q.

    Smoothing: a key missing from p has probability 0 there. A key missing from q, or with
    q = 0, gets mass `eps` instead, so the divergence stays finite when P puts mass where Q
    has none. Both are then renormalised to sum to 1 (inputs may be unnormalised counts).
    Raises ValueError on negative values or when p has no mass.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    keys = sorted(set(p) | set(q))
    if not keys:
        raise ValueError("p and q are both empty")
    pa = np.array([float(p.get(k, 0.0)) for k in keys])
    qa = np.array([float(q.get(k, 0.0)) for k in keys])
    if (pa < 0).any() or (qa < 0).any() or not np.isfinite(pa).all() or not np.isfinite(qa).all():
        raise ValueError("probabilities must be finite and non-negative")
    if pa.sum() <= 0:
        raise ValueError("p has no probability mass")
    qa = np.where(qa > 0, qa, eps)
    # scipy renormalises both sides and takes 0 * log(0 / q) as 0.
    return float(sps.entropy(pa, qa))


def sign_agreement(a: Sequence[float], b: Sequence[float]) -> float:
    """Return the fraction of positions where sign(a_i) == sign(b_i).

    Zero is its own sign (0 agrees only with 0). Positions where either value is NaN or
    infinite are dropped; raises ValueError when nothing is left.
    """
    aa, bb = _paired_finite(a, b)
    if aa.size == 0:
        raise ValueError("sign agreement needs at least one finite pair")
    return float(np.mean(np.sign(aa) == np.sign(bb)))


def _count(value: float, name: str) -> int:
    """Return a count as int (scipy's binomtest takes integers only); raise on a fraction."""
    if not float(value).is_integer():
        raise ValueError(f"{name} must be a whole number of trials, got {value!r}")
    return int(value)


def proportion_ci(k: int, n: int, ci: float = 0.95) -> Estimate:
    """Return k/n with scipy's Wilson score interval.

    Each trial is treated as its own group, so the Estimate has n_groups = n_obs = n.
    Counts may be integral floats (3.0); anything else raises ValueError.
    """
    k, n = _count(k, "k"), _count(n, "n")
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got k={k}, n={n}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    interval = sps.binomtest(k, n).proportion_ci(confidence_level=ci, method="wilson")
    # scipy returns exactly 0 for k = 0 and exactly 1 for k = n.
    return Estimate(
        value=k / n,
        lo=float(interval.low),
        hi=float(interval.high),
        n_groups=int(n),
        n_obs=int(n),
    )
