"""Preferences elicitation throughput: pair-orders/s of the logprob backend, prefix caching on/off.

A randomly initialised model of a real shape (bf16) scores the pair-orders of one active-
learning round: --pairs random pairs of --tasks tasks, each pair in both orders, through
llmlab.preferences.elicit.ChoiceScorer with the default template. Task lengths follow the
long-tailed mix (20 to --max-task tokens). With fewer tasks each task A recurs in more orders
and prefix sharing has more to share; with --tasks about 2 x pairs most task As appear once
and the scorer falls back to the plain plan (caching must never cost more than it saves).
Rows: plain forward passes vs prefix caching, per scenario; tokens per pair-order counts the
real tokens run and the tokens processed including padding. The run's 10k-task size (up to
~500k pair-orders) divided by the rate gives the hours a full measurement takes.
Usage: python benchmarks/bench_elicit.py --shape llama-3.1-8b --tokenizer DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, device_name, prompt_lengths, random_loaded, report  # noqa: E402

from llmlab.preferences.elicit import ChoiceScorer, PairOrder  # noqa: E402
from llmlab.preferences.prompts import DEFAULT_TEMPLATE  # noqa: E402

WORDS = "write explain list compare summarise plan describe draft the a of to and in for".split()


def round_orders(n_tasks: int, n_pairs: int, max_task: int, seed: int) -> list[PairOrder]:
    """Return both orders of n_pairs random distinct pairs among n_tasks synthetic tasks."""
    rng = np.random.default_rng(seed)
    lengths = prompt_lengths(n_tasks, seed, high=max_task)
    tasks = [
        " ".join(WORDS[(i + j) % len(WORDS)] for j in range(max(1, int(n * 0.8)))) + f" #{i}"
        for i, n in enumerate(lengths)
    ]
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_pairs:
        a, b = (int(x) for x in rng.choice(n_tasks, 2, replace=False))
        pairs.add((min(a, b), max(a, b)))
    orders = []
    for a, b in sorted(pairs):
        orders += [PairOrder(tasks[a], tasks[b]), PairOrder(tasks[b], tasks[a])]
    return orders


def main() -> None:
    """Print and append the table of pair-orders/s per scenario and path."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--scenarios", default="100x600,2400x600", help="TASKSxPAIRS,...")
    ap.add_argument("--max-task", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = random_loaded(args.shape, tok, device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    warm = round_orders(20, 20, args.max_task, seed=99)
    rows = []
    for scenario in args.scenarios.split(","):
        n_tasks, n_pairs = (int(x) for x in scenario.split("x"))
        orders = round_orders(n_tasks, n_pairs, args.max_task, seed=0)
        for cache in (False, True):
            scorer = ChoiceScorer(loaded, DEFAULT_TEMPLATE, args.batch_size, cache, args.max_tokens)
            scorer.p_first(warm)  # kernels and allocator for this path
            scorer.n_orders = scorer.n_forward_tokens = scorer.n_padded_tokens = 0
            sync()
            t = time.perf_counter()
            scorer.p_first(orders)
            sync()
            secs = time.perf_counter() - t
            name = "prefix caching (shared plan when cheaper)" if cache else "plain forward"
            print(f"{scenario} {name}: {len(orders)} orders in {secs:.2f}s", flush=True)
            rows.append({
                "tasks x pairs": scenario, "method": name, "pair-orders": len(orders),
                "seconds": secs, "pair-orders/s": len(orders) / secs,
                "real tokens / order": scorer.n_forward_tokens / len(orders),
                "processed tokens / order": scorer.n_padded_tokens / len(orders),
                "hours for 500k orders": 500_000 / (len(orders) / secs) / 3600,
                "device": device_name(), "model": args.shape,
            })  # fmt: skip
        rows[-1]["ratio"] = rows[-1]["pair-orders/s"] / rows[-2]["pair-orders/s"]
        rows[-2]["ratio"] = 1.0
    report(
        f"Preferences elicitation ({args.shape}, logprob backend, batch {args.batch_size})",
        rows,
        append=not args.no_append,
    )


if __name__ == "__main__":
    main()
