"""Benchmark: active pair selection vs random pairing on synthetic Thurstonian data.

Items have known utilities; each comparison is answered by `--samples` draws per order (as the
sampling backend would), so pairs far apart carry little information. Both arms start from
the same random 2-regular graph and refit after every batch. The table gives held-out
accuracy (share of 5,000 random held-out pairs ordered as the true utilities order them) and
the Spearman correlation with the truth at each comparison budget, averaged over seeds, and
the fewest comparisons with which each arm reaches random pairing's final accuracy.

    python benchmarks/bench_active_learning.py [--items 150] [--seeds 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import special

from llmlab.preferences.active import ActiveConfig, run_active
from llmlab.preferences.thurstonian import rank_corr


def oracle(mu: np.ndarray, sigma: np.ndarray, samples: int, seed: int):
    """Return a measure(pairs) callback with binomial noise."""
    rng = np.random.default_rng(seed)

    def measure(pairs: list[tuple[int, int]]) -> list[float]:
        a = np.array(pairs)
        q = special.ndtr((mu[a[:, 0]] - mu[a[:, 1]]) / np.hypot(sigma[a[:, 0]], sigma[a[:, 1]]))
        return (rng.binomial(samples, q) / samples).tolist()

    return measure


def accuracy(mu_hat: np.ndarray, mu: np.ndarray, seed: int) -> float:
    """Return the share of random held-out pairs ordered like the true utilities."""
    rng = np.random.default_rng(10_000 + seed)
    i = rng.integers(0, mu.size, 5000)
    j = (i + rng.integers(1, mu.size, 5000)) % mu.size
    return float(np.mean((mu_hat[i] > mu_hat[j]) == (mu[i] > mu[j])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=6, help="answers per pair (both orders)")
    ap.add_argument("--batch", type=int, default=75)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = args.items
    budgets = [int(n * k) for k in (2, 3, 4, 6, 8, 10)]
    res: dict[str, dict[int, list[tuple[float, float]]]] = {"active": {}, "random": {}}
    t0 = time.time()
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        mu, sigma = rng.normal(size=n), rng.uniform(0.2, 0.5, size=n)
        for arm in res:
            for b in budgets:
                cfg = ActiveConfig(batch_size=args.batch, edge_budget=b, convergence_threshold=1.1)
                out = run_active(
                    n,
                    oracle(mu, sigma, args.samples, seed),
                    cfg,
                    seed=seed,
                    random_pairs=arm == "random",
                )
                res[arm].setdefault(b, []).append(
                    (accuracy(out.fit.mu, mu, seed), rank_corr(out.fit.mu, mu))
                )
    mean = {arm: {b: np.mean(v, axis=0) for b, v in d.items()} for arm, d in res.items()}
    target = mean["random"][budgets[-1]][0]
    print(
        f"{n} items, {args.samples} answers per pair, {args.seeds} seeds "
        f"({time.time() - t0:.0f}s)\n"
    )
    print("| comparisons | active acc | random acc | active rank r | random rank r |")
    print("| --- | --- | --- | --- | --- |")
    for b in budgets:
        a, r = mean["active"][b], mean["random"][b]
        print(f"| {b} | {a[0]:.4f} | {r[0]:.4f} | {a[1]:.4f} | {r[1]:.4f} |")
    reach = {
        arm: next((b for b in budgets if mean[arm][b][0] >= target - 1e-9), None) for arm in mean
    }
    print(
        f"\nrandom pairing's final accuracy {target:.4f} is reached with {reach['active']} "
        f"comparisons (active) vs {reach['random']} (random)"
    )
    if args.out:
        doc = {arm: {str(b): list(map(float, v)) for b, v in d.items()} for arm, d in mean.items()}
        doc["reach"] = reach
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)


if __name__ == "__main__":
    main()
