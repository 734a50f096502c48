"""On CUDA: does the static-cache + CUDA-graph decode give the dynamic cache's tokens?

Generates greedy answers to the benchmark's long-tailed prompts twice through
llmlab.generation.generate, under bench_generation's graphed_decode() and dynamic_cache()
switches, and prints how many rows agree token for token and how many decode steps were
replayed from a graph. fp32 on the small shape (weights drawn with a larger spread so
greedy tokens vary) should agree exactly; bf16 on a real shape can part where two logits tie
within bf16 rounding (the static cache attends over its full masked length), so its agreement is
printed, not asserted.
Usage: python benchmarks/check_graphed_decode.py --tokenizer DIR [--shape llama-3.1-8b --n 64]
"""

from __future__ import annotations

import argparse

import torch
from bench_activations import make_items
from bench_generation import dynamic_cache, graphed_decode
from common import random_loaded

from llmlab.generation import GraphedDecode, generate


def answers(loaded, convs, new_tokens: int, graphed: bool) -> tuple[list[str], int]:
    """Return generate's greedy answers and the decode steps replayed from graphs."""
    replays = 0
    real_exit = GraphedDecode.__exit__

    def counting_exit(self, *exc):
        nonlocal replays
        replays += self.replays
        return real_exit(self, *exc)

    GraphedDecode.__exit__ = counting_exit
    try:
        with graphed_decode() if graphed else dynamic_cache():
            out = generate(
                loaded, convs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                batch_size=len(convs), max_tokens_per_batch="auto", temperature=0.0,
                progress=False,
            )  # fmt: skip
    finally:
        GraphedDecode.__exit__ = real_exit
    return out, replays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    dtype = torch.float32 if args.shape == "tiny" else torch.bfloat16
    torch.manual_seed(0)
    loaded = random_loaded(args.shape, tok, "cuda", dtype)
    if args.shape == "tiny":
        with torch.no_grad():
            for p in loaded.model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.1)
    convs = [it.messages for it in make_items(tok, args.n, seed=0)]
    dynamic, _ = answers(loaded, convs, args.new_tokens, graphed=False)
    graphed, replays = answers(loaded, convs, args.new_tokens, graphed=True)
    same = sum(a == b for a, b in zip(dynamic, graphed, strict=True))
    distinct = len(set(dynamic))
    print(
        f"{args.shape} {dtype}: {same} of {len(convs)} rows identical, {distinct} distinct "
        f"answers, {replays} decode steps replayed from CUDA graphs",
        flush=True,
    )


if __name__ == "__main__":
    main()
