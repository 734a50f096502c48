"""Evaluation generation throughput: compiled decode and memory-sized batches against today's path.

A randomly initialised model of a real shape (bf16) answers --n prompts of the long-tailed
length mix (20-1000 tokens) with exactly --new-tokens tokens each (min_new_tokens, since a
random model may end early). Rows, all through llmlab.generation.generate, in one process:

- today: batches of 16 rows under a 16,384-token budget (the defaults), run on every
  --baseline-every-th prompt (same length mix, less device time);
- eager: up to --batch-size rows under the budget from free memory (max_tokens_per_batch="auto");
- compiled warm-up: decode="compiled" on a few prompts (torch.compile of the decode step; paid
  once per process), timed on its own;
- compiled: decode="compiled", memory-sized batches of up to each of --compiled-batch-sizes rows;
- with --steer, eager + steering (1 layer), since steering is refused with decode="compiled";
- generate excludes SDPA's cuDNN backend on CUDA (llmlab.generation.decode_attention) and
  prefills a batch of very different prompt lengths in length-sorted chunks (llmlab.prefill);
  the rows marked "before" undo both (cuDNN first, the dispatcher's default on Hopper, and one
  prefill forward per batch), so the path as it was before those changes is the baseline of
  the same run; the first row, batches of 16 that way, is the path the issue measured at
  161-268 tokens/s; --before-memory-sized adds that path with memory-sized batches;
- "one prefill forward" rows keep decode_attention but turn the chunked prefill off, so the
  eager memory-sized row is timed with and without it;
- --greedy-plan adds the eager memory-sized row with the greedy batch plan generate used before
  llmlab.chat.balanced_token_budget_batches (same batch count, a small last batch);
- --eager-batch-sizes adds eager rows at other row caps (fewer batches, fewer decode steps).
  --compiled-batch-sizes '' skips the compiled rows (their warm-up is a 2-minute compile).
- on CUDA, generate decodes the eager memory-sized batches from a static cache with each
  batch's decode step replayed as a CUDA graph (llmlab.generation.GraphedDecode); the row
  "before (dynamic cache, eager decode steps)" turns that off (GRAPHED_DECODE_DEVICES = ()), the
  path as it was, in the same run; --repeats N times both rows N times, alternating;

--split-prefill adds, for both eager memory-sized rows and the first compiled row, the same
batches with one new token (prefill + one sampling step); the rest of the run is decode steps.
Output tokens/s counts new tokens only. Results are appended to benchmarks/RESULTS.md.
--prefill-chunk-tokens sets llmlab.prefill.PREFILL_CHUNK_TOKENS for the run.
--device cpu --shape tiny checks the script's paths on a CPU (fp32; batches under generate's
16,384-token default, so a small --prefill-chunk-tokens is what makes it chunk there).
Usage: python benchmarks/bench_generation.py --shape llama-3.1-8b --tokenizer DIR \
    --n 512 --new-tokens 128 --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_activations import make_items  # noqa: E402
from common import SHAPES, device_name, random_loaded, report  # noqa: E402

import llmlab.generation  # noqa: E402
import llmlab.prefill  # noqa: E402
from llmlab.chat import padded_tokens  # noqa: E402
from llmlab.generation import DEFAULT_TOKENS_PER_BATCH, auto_token_budget, generate  # noqa: E402
from llmlab.prefill import chunk_plan  # noqa: E402
from llmlab.steering import steer  # noqa: E402


def timed(fn, device: str) -> tuple[float, float | None]:
    """Return (seconds, peak GiB) of fn; the peak on CUDA only (None on the CPU)."""
    if device != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t, None
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**30


@contextlib.contextmanager
def patched(**attrs):
    """Replace llmlab.generation attributes for the duration (the "before" switches)."""
    kept = {name: getattr(llmlab.generation, name) for name in attrs}
    for name, value in attrs.items():
        setattr(llmlab.generation, name, value)
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(llmlab.generation, name, value)


def one_prefill_forward():
    """generate() without the chunked prefill: each batch prefilled in one forward."""
    return patched(length_sorted_prefill=lambda *args, **kwargs: None)


def before():
    """generate() as it was before decode_attention and the chunked prefill: SDPA's default
    order (cuDNN first) and one prefill forward per batch."""
    return patched(
        decode_attention=lambda device: contextlib.nullcontext(),
        length_sorted_prefill=lambda *args, **kwargs: None,
    )


def dynamic_cache():
    """generate() without the static cache and CUDA-graph decode: a DynamicCache grown by
    torch.cat and every decode step's kernels launched one by one from Python, as before."""
    return patched(GRAPHED_DECODE_DEVICES=())


def graphed_decode():
    """generate() with the static cache + CUDA-graph decode on CUDA, whatever the default."""
    return patched(GRAPHED_DECODE_DEVICES=("cuda",))


def greedy_plan():
    """generate() with the greedy batch plan it used before the balanced one (a small tail)."""
    from llmlab.chat import token_budget_batches

    return patched(balanced_token_budget_batches=token_budget_batches)


def main() -> None:
    """Print and append the table of output tokens/s per decode and batching."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--compiled-batch-sizes", default="256", help="comma-separated row caps")
    ap.add_argument("--baseline-every", type=int, default=16)
    ap.add_argument("--steer", action="store_true", help="add the eager + steering row")
    ap.add_argument("--eager-batch-sizes", default="", help="more eager row caps, comma-separated")
    ap.add_argument("--split-prefill", action="store_true", help="time prefill vs decode")
    ap.add_argument(
        "--before-memory-sized", action="store_true",
        help="add the before path (cuDNN first, one prefill forward) with memory-sized batches",
    )  # fmt: skip
    ap.add_argument(
        "--greedy-plan", action="store_true",
        help="add the eager memory-sized row with the greedy batch plan (before the balanced one)",
    )  # fmt: skip
    ap.add_argument(
        "--repeats", type=int, default=1,
        help="time the memory-sized row and its dynamic-cache baseline this many times each",
    )  # fmt: skip
    ap.add_argument("--prefill-chunk-tokens", type=int, default=None)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    if args.prefill_chunk_tokens is not None:
        llmlab.prefill.PREFILL_CHUNK_TOKENS = args.prefill_chunk_tokens
    device = args.device
    empty_cache = torch.cuda.empty_cache if device == "cuda" else lambda: None
    from transformers import AutoTokenizer

    from llmlab.chat import encode_chat

    print(f"SDPA backend priority: {torch._C._get_sdp_priority_order()}", flush=True)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    loaded = random_loaded(args.shape, tok, device)  # bf16 on CUDA, fp32 on the CPU
    convs = [it.messages for it in make_items(tok, args.n, seed=0)]
    lengths = [len(encode_chat(tok, c, chat=True).input_ids) for c in convs]
    subset = convs[:: args.baseline_every]

    def run(prompts, steered: bool = False, **kw) -> None:
        def factory(rows, mask):
            vectors = torch.randn(len(rows), loaded.hidden_size, device=loaded.device)
            return steer(loaded.layers, [loaded.n_layers // 2], vectors, scale=2.0)

        generate(
            loaded,
            prompts,
            max_new_tokens=kw.pop("max_new_tokens", args.new_tokens),
            min_new_tokens=args.new_tokens,
            progress=False,
            steer=factory if steered else None,
            **kw,
        )

    def plan(cap: int) -> tuple[int, list[list[int]]]:
        """Return the auto budget now and the batches it gives (what generate will form)."""
        empty_cache()
        budget = auto_token_budget(loaded) or DEFAULT_TOKENS_PER_BATCH
        batches = llmlab.generation.balanced_token_budget_batches(  # greedy_plan() patches it
            [n + args.new_tokens for n in lengths], cap, budget
        )
        return budget, batches

    def prefill_plan(cap: int) -> str:
        """Return each batch's padded prefill tokens in one forward and in length-sorted chunks
        (the chunks whatever generate decides; it chunks a batch only where they save > 10%)."""
        parts = []
        for b in plan(cap)[1]:
            widths = [lengths[i] - 1 for i in b]
            chunks = chunk_plan(widths, llmlab.prefill.PREFILL_CHUNK_TOKENS)
            parts.append(
                f"{len(b)} x {max(widths)} = {len(b) * max(widths)} -> {len(chunks)} chunks, "
                f"{padded_tokens(widths, chunks)} (real {sum(widths)})"
            )
        return "; ".join(parts)

    rows: list[dict] = []

    def case(name: str, prompts, tokens: int | None = None, **kw) -> float | None:
        empty_cache()  # the budget reads free memory: no cached blocks of the last case
        try:
            secs, mem = timed(lambda: run(prompts, **kw), device)
        except Exception as e:  # one failing variant must not hide the others' numbers
            msg = f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(msg, flush=True)
            rows.append({"method": msg})
            return None
        tokens = len(prompts) * args.new_tokens if tokens is None else tokens
        peak = "" if mem is None else f", peak {mem:.1f} GiB"
        print(f"{name}: {tokens} tokens in {secs:.2f}s{peak}", flush=True)
        rows.append({
            "method": name, "prompts": len(prompts), "new tokens": tokens, "seconds": secs,
            "output tokens/s": tokens / secs, "peak GiB": "" if mem is None else mem,
            "device": device_name(), "model": args.shape,
        })  # fmt: skip
        return secs

    def split(name: str, full: float | None, cap: int, **kw) -> None:
        """Add a row timing the same batches with one new token: prefill vs decode."""
        if full is None:
            return
        empty_cache()
        budget, batches = plan(cap)
        widths = [max(lengths[i] for i in b) for b in batches]
        # the full run's batches: planned for one new token, the budget would admit more rows
        with patched(balanced_token_budget_batches=lambda *args, **kwargs: batches):
            secs, mem = timed(
                lambda: generate(
                    loaded, convs, max_new_tokens=1, batch_size=cap, max_tokens_per_batch=budget,
                    progress=False, **kw,
                ),
                device,
            )  # fmt: skip
        steps = len(batches) * (args.new_tokens - 1)
        note = (
            f"split of the {name} run: {len(batches)} batches of {[len(b) for b in batches]} rows, "
            f"prompt widths {widths} (budget {budget} tokens); prefill {secs:.2f} s, decode "
            f"{full - secs:.2f} s over {steps} steps = {1e3 * (full - secs) / steps:.1f} ms per step"
        )
        print(note, flush=True)
        rows.append({
            "method": note, "prompts": len(convs), "seconds": secs,
            "peak GiB": "" if mem is None else mem,
        })  # fmt: skip

    run(subset[:4], batch_size=4)  # warm-up (kernels, allocator)
    with before():
        case(
            "before (cuDNN SDPA first, one prefill forward): generate, 16 rows x 16,384 "
            "tokens/batch", subset, batch_size=16,
        )  # fmt: skip
        print(f"eager plan: {[len(b) for b in plan(args.batch_size)[1]]} rows", flush=True)
        if args.before_memory_sized:
            case(
                f"before (cuDNN SDPA first, one prefill forward): eager generate, "
                f"<= {args.batch_size} rows, memory-sized", convs, batch_size=args.batch_size,
                max_tokens_per_batch="auto",
            )  # fmt: skip
    case("generate, 16 rows x 16,384 tokens/batch", subset, batch_size=16)
    print(
        f"prefill tokens per batch, one forward -> length-sorted chunks of <= "
        f"{llmlab.prefill.PREFILL_CHUNK_TOKENS} padded tokens: {prefill_plan(args.batch_size)}",
        flush=True,
    )
    with one_prefill_forward():
        name = "eager, one prefill forward"
        full = case(
            f"eager generate, <= {args.batch_size} rows, memory-sized budget, one prefill forward",
            convs, batch_size=args.batch_size, max_tokens_per_batch="auto",
        )  # fmt: skip
        if args.split_prefill:
            split(name, full, args.batch_size)
    for r in range(args.repeats):
        tag = f" (run {r + 1} of {args.repeats})" if args.repeats > 1 else ""
        with graphed_decode():
            eager = case(
                f"eager generate, <= {args.batch_size} rows, memory-sized budget, length-sorted "
                f"chunked prefill ({llmlab.prefill.PREFILL_CHUNK_TOKENS} tokens/chunk), static "
                f"cache + CUDA-graph decode{tag}", convs, batch_size=args.batch_size,
                max_tokens_per_batch="auto",
            )  # fmt: skip
            if args.split_prefill and r == 0:
                split("static cache + CUDA-graph decode", eager, args.batch_size)
        with dynamic_cache():
            secs = case(
                f"before (dynamic cache, eager decode steps): eager generate, <= {args.batch_size}"
                f" rows, memory-sized budget, chunked prefill{tag}", convs,
                batch_size=args.batch_size, max_tokens_per_batch="auto",
            )  # fmt: skip
            if args.split_prefill and r == 0:
                split("dynamic cache", secs, args.batch_size)
    if args.greedy_plan:
        with greedy_plan():
            print(f"greedy plan: {[len(b) for b in plan(args.batch_size)[1]]} rows", flush=True)
            secs = case(
                f"before (greedy batch plan): eager generate, <= {args.batch_size} rows, "
                f"memory-sized budget, chunked prefill", convs, batch_size=args.batch_size,
                max_tokens_per_batch="auto",
            )  # fmt: skip
            if args.split_prefill:
                split("greedy plan", secs, args.batch_size)
    for cap in (int(c) for c in args.eager_batch_sizes.split(",") if c):
        print(f"eager plan (<= {cap} rows): {[len(b) for b in plan(cap)[1]]} rows", flush=True)
        secs = case(
            f"eager generate, <= {cap} rows, memory-sized budget",
            convs, batch_size=cap, max_tokens_per_batch="auto",
        )  # fmt: skip
        if args.split_prefill:
            split(f"eager (<= {cap} rows)", secs, cap)
    if args.steer:
        case(
            f"eager generate + steering (1 layer), <= {args.batch_size} rows, memory-sized budget",
            convs, batch_size=args.batch_size, max_tokens_per_batch="auto", steered=True,
        )  # fmt: skip
    compiled_caps = [int(c) for c in args.compiled_batch_sizes.split(",") if c]
    if compiled_caps:
        # Compile once (dynamic shapes) on batches of two row counts, so the timed runs below
        # measure steady-state decoding; the warm-up's seconds are the per-process compile cost.
        warm = convs[-6:]
        case("compiled decode: warm-up (torch.compile), batches of 4 + 2 rows", warm,
             batch_size=4, decode="compiled")  # fmt: skip
    for i, cap in enumerate(compiled_caps):
        print(f"compiled plan (<= {cap} rows): {[len(b) for b in plan(cap)[1]]} rows", flush=True)
        secs = case(
            f"compiled decode (static cache, CUDA graphs), <= {cap} rows, memory-sized budget",
            convs, batch_size=cap, max_tokens_per_batch="auto", decode="compiled",
        )  # fmt: skip
        if args.split_prefill and i == 0:
            split(f"compiled (<= {cap} rows)", secs, cap, decode="compiled")
    base = rows[0].get("output tokens/s")
    for r in rows:
        if base and "output tokens/s" in r:
            r["ratio"] = r["output tokens/s"] / base
    report(
        f"Evaluation generation ({args.shape}, {device}, {args.new_tokens} new tokens)",
        rows,
        append=not args.no_append,
    )


if __name__ == "__main__":
    main()
