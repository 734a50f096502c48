"""Evaluation generation throughput: batches sized by KV-cache memory against today's batches.

A randomly initialised model of a real shape (bf16) answers --n prompts of the long-tailed
length mix (20-1000 tokens) with exactly --new-tokens tokens each (min_new_tokens, since a
random model may end early). Rows, all through llmlab.generation.generate:

- today: batches of 16 rows under a 16,384-token budget (the defaults), run on every
  --baseline-every-th prompt (same length mix, less device time);
- auto: up to --batch-size rows under the budget from free memory (max_tokens_per_batch="auto");
- auto + steering: the same with a steering hook on one layer (per-row vectors).

Output tokens/s counts new tokens only. Results are appended to benchmarks/RESULTS.md.
Usage: python benchmarks/bench_generation.py --shape llama-3.1-8b --tokenizer DIR \
    --n 512 --new-tokens 128 --batch-size 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_activations import make_items  # noqa: E402
from common import SHAPES, device_name, random_loaded, report  # noqa: E402

from llmlab.generation import auto_token_budget, generate  # noqa: E402
from llmlab.steering import steer  # noqa: E402


def timed(fn) -> tuple[float, float]:
    """Return (seconds, peak GiB) of fn on the GPU."""
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    """Print and append the table of output tokens/s per batching."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--baseline-every", type=int, default=8)
    ap.add_argument("--split-prefill", action="store_true", help="time prefill vs decode")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    loaded = random_loaded(args.shape, tok, "cuda", torch.bfloat16)
    convs = [it.messages for it in make_items(tok, args.n, seed=0)]
    subset = convs[:: args.baseline_every]
    print(f"auto budget: {auto_token_budget(loaded)} tokens per batch", flush=True)

    def run(prompts, steered: bool = False, **kw) -> None:
        def factory(rows, mask):
            vectors = torch.randn(len(rows), loaded.hidden_size, device=loaded.device)
            return steer(loaded.layers, [loaded.n_layers // 2], vectors, scale=2.0)

        generate(
            loaded,
            prompts,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            progress=False,
            steer=factory if steered else None,
            **kw,
        )

    run(subset[:4], batch_size=4)  # warm-up (kernels, allocator)
    cases = [
        ("today: generate, 16 rows x 16,384 tokens/batch", subset, dict(batch_size=16)),
        (
            f"generate, <= {args.batch_size} rows, memory-sized budget",
            convs,
            dict(batch_size=args.batch_size, max_tokens_per_batch="auto"),
        ),
        (
            f"generate + steering (1 layer), <= {args.batch_size} rows, memory-sized budget",
            convs,
            dict(batch_size=args.batch_size, max_tokens_per_batch="auto", steered=True),
        ),
    ]
    rows = []
    for name, prompts, kw in cases:
        secs, mem = timed(lambda prompts=prompts, kw=kw: run(prompts, **kw))
        tokens = len(prompts) * args.new_tokens
        print(f"{name}: {tokens} tokens in {secs:.2f}s, peak {mem:.1f} GiB", flush=True)
        rows.append({
            "method": name, "prompts": len(prompts), "new tokens": tokens, "seconds": secs,
            "output tokens/s": tokens / secs, "peak GiB": mem,
            "device": device_name(), "model": args.shape,
        })  # fmt: skip
    if args.split_prefill:
        # Where the time goes: the same batches with one new token (prefill and one sampling
        # step) against the full run; the rest is decode steps (batches x (new tokens - 1)).
        from llmlab.chat import encode_chat, token_budget_batches

        lengths = [len(encode_chat(tok, c, chat=True).input_ids) for c in convs]
        budget = auto_token_budget(loaded)
        plan = token_budget_batches([n + args.new_tokens for n in lengths], args.batch_size, budget)
        widths = [max(lengths[i] for i in b) for b in plan]
        secs, mem = timed(
            lambda: generate(
                loaded, convs, max_new_tokens=1, batch_size=args.batch_size,
                max_tokens_per_batch=budget, progress=False,
            )
        )  # fmt: skip
        full = rows[1]["seconds"]
        steps = len(plan) * (args.new_tokens - 1)
        note = (
            f"split of the memory-sized run: {len(plan)} batches of {[len(b) for b in plan]} "
            f"rows, prompt widths {widths}; prefill {secs:.2f} s, decode {full - secs:.2f} s "
            f"over {steps} steps = {1e3 * (full - secs) / steps:.0f} ms per decode step"
        )
        print(note, flush=True)
        rows.append({"method": note, "prompts": len(convs), "seconds": secs, "peak GiB": mem})
    for r in rows[:3]:
        r["ratio"] = r["output tokens/s"] / rows[0]["output tokens/s"]
    report(
        f"Evaluation generation ({args.shape}, cuda, {args.new_tokens} new tokens)",
        rows,
        append=not args.no_append,
    )


if __name__ == "__main__":
    main()
