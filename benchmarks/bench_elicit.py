"""Preferences elicitation throughput: pair-orders/s of the logprob backend, prefix caching on/off.

A randomly initialised model of a real shape (bf16) scores the pair-orders of one active-
learning round: PAIRS random pairs of TASKS tasks, each pair in both orders, through
llmlab.preferences.elicit.ChoiceScorer with the default template. Task lengths follow the
long-tailed mix (20 to --max-task tokens). With fewer tasks each task A recurs in more orders
and the prefix cache has more to share: 100x2500 shows each task A in about 50 orders, as the
seed's 10k-task run does (~500k pair-orders); with TASKS about 2 x PAIRS most task As appear
once and the scorer falls back to the plain plan (caching must never cost more than it saves).
Rows: plain forward passes vs the prefix-cached plan (each distinct prefix prefilled once,
suffix batches formed across prefixes by suffix length), per scenario, with the plan that ran;
tokens per pair-order counts the real tokens run and the tokens processed including padding.
500k pair-orders divided by the rate gives the hours a full measurement takes.
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

from llmlab.preferences.elicit import PREFIX_CACHE, ChoiceScorer, PairOrder  # noqa: E402
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
    ap.add_argument("--scenarios", default="100x600,2400x600,100x2500", help="TASKSxPAIRS,...")
    ap.add_argument("--max-task", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument(
        "--kv-tokens", type=int, default=32768, help="prefix cache budget (ChoiceScorer)"
    )
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = random_loaded(args.shape, tok, device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    # task As repeat here, so the warm-up runs the prefix-cached plan's kernels too
    warm = round_orders(20, 60, args.max_task, seed=99)
    rows = []
    for scenario in args.scenarios.split(","):
        n_tasks, n_pairs = (int(x) for x in scenario.split("x"))
        if n_pairs > n_tasks * (n_tasks - 1) // 2:
            raise SystemExit(f"--scenarios {scenario}: {n_tasks} tasks have fewer distinct pairs")
        orders = round_orders(n_tasks, n_pairs, args.max_task, seed=0)
        per_a = len(orders) / len({o.task_a for o in orders})
        for cache in (False, True):
            scorer = ChoiceScorer(
                loaded, DEFAULT_TEMPLATE, args.batch_size, cache, args.max_tokens, args.kv_tokens
            )
            scorer.p_first(warm)  # kernels and allocator for this path
            scorer.n_orders = scorer.n_forward_tokens = scorer.n_padded_tokens = 0
            sync()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            choices = scorer.p_first(orders)
            sync()
            secs = time.perf_counter() - t
            name = "prefix cache (when cheaper)" if cache else "plain forward"
            plan = scorer.last_plan
            print(f"{scenario} {name} [{plan}]: {len(orders)} orders in {secs:.2f}s", flush=True)
            row = {
                "tasks x pairs": scenario, "orders / task A": per_a, "method": name,
                "plan run": plan, "pair-orders": len(orders), "seconds": secs,
                "pair-orders/s": len(orders) / secs,
                "real tokens / order": scorer.n_forward_tokens / len(orders),
                "processed tokens / order": scorer.n_padded_tokens / len(orders),
                "hours for 500k orders": 500_000 / (len(orders) / secs) / 3600,
            }  # fmt: skip
            # Same probabilities whichever plan ran (bf16 rounding differs between plans)
            p = np.array([ch.p_first for ch in choices])
            if not cache:
                p_plain = p
            row["max |P - P plain|"] = f"{np.abs(p - p_plain).max():.1e}"
            if device == "cuda":
                row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
            row.update({"device": device_name(), "model": args.shape})
            rows.append(row)
        rows[-1]["ratio"] = rows[-1]["pair-orders/s"] / rows[-2]["pair-orders/s"]
        rows[-2]["ratio"] = 1.0
        if rows[-1]["plan run"] == PREFIX_CACHE and (
            rows[-1]["processed tokens / order"] >= rows[-2]["processed tokens / order"]
        ):
            raise SystemExit(
                f"{scenario}: the prefix-cached plan ran but processed no fewer tokens"
            )
    report(
        f"Preferences elicitation ({args.shape}, logprob backend, batch {args.batch_size}, "
        f"{args.max_tokens} tokens/pass, prefix cache {args.kv_tokens} tokens)",
        rows,
        append=not args.no_append,
    )


if __name__ == "__main__":
    main()
