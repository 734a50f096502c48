"""Activation capture throughput against the naive baseline, measured in the same run.

Baseline: `output_hidden_states=True` over unsorted batches of fixed size, every layer kept
by the model, positions read afterwards. llmlab: length-grouped batches under a token budget,
hooks on the needed layers only, forward stopped after the deepest one, rows streamed to
one file per layer. Tokens/s counts real (non-padding) tokens. On a GPU, MFU counts
2 x (parameters of the layers actually run) FLOPs per token against --peak-tflops.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, device_name, prompt_lengths, random_loaded, report  # noqa: E402

from llmlab.activations import CaptureItem, capture_to_disk, encode_items  # noqa: E402
from llmlab.chat import collate, encode_chat  # noqa: E402
from llmlab.layers import resolve_layers  # noqa: E402
from llmlab.models import LoadedModel, decoder_layers, load_model  # noqa: E402

LAYERS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
WORDS = "the of and to in a is that for it as was with be by on not he this are or".split()


def make_items(tok, n: int, seed: int) -> list[CaptureItem]:
    """Return n prompts whose token lengths follow the long-tailed length mix."""
    items = []
    for i, length in enumerate(prompt_lengths(n, seed)):
        words = [WORDS[(i + j) % len(WORDS)] for j in range(max(1, int(length * 0.8)))]
        items.append(CaptureItem(f"p{i}", [{"role": "user", "content": " ".join(words)}]))
    return items


@torch.no_grad()
def naive_capture(loaded: LoadedModel, items, layers, batch_size: int) -> None:
    """Baseline: every hidden state of padded, unsorted batches; positions read afterwards."""
    tok = loaded.tokenizer
    for start in range(0, len(items), batch_size):
        enc = [
            encode_chat(tok, it.messages, chat=loaded.chat)
            for it in items[start : start + batch_size]
        ]
        b = collate(enc, tok.pad_token_id, padding_side="right").to(loaded.device)
        out = loaded.model(
            input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True
        )
        idx = b.positions("prompt_last").to(loaded.device)
        rows = torch.arange(len(enc), device=loaded.device)
        for layer in layers:
            out.hidden_states[layer + 1][rows, idx].float().cpu()


def _rss_gib() -> float:
    """Return this process's resident memory in GiB (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _max_rss_gib() -> float:
    """Return this process's peak resident memory in GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def layer_params(model, upto: int) -> int:
    """Return parameters in decoder layers 0..upto (what a stopped forward runs)."""
    layers = decoder_layers(model)
    return sum(p.numel() for layer in layers[: upto + 1] for p in layer.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=["embedded", *SHAPES], default="embedded")
    ap.add_argument("--n", type=int, default=192, help="prompts")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--max-tokens", default="8192", help="llmlab token budget(s) per batch, comma-separated"
    )
    ap.add_argument(
        "--baseline-n",
        type=int,
        default=None,
        help="baseline on the first N prompts only (rate compared)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="print the top CUDA kernels of one capture batch"
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="bf16 matmul peak for MFU (default: measured in this run by an 8192^3 product)",
    )
    ap.add_argument(
        "--forward-ref",
        default="256x256",
        help="RxL: also time a bare stopped forward of one R x L batch (the model's own ceiling)",
    )
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for random-shape models")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="after the eager runs, repeat each budget with norms and MLPs compiled",
    )
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shape == "embedded":
        from conftest_shim import embedded_params

        loaded = load_model(embedded_params())
    else:
        from transformers import AutoTokenizer

        loaded = random_loaded(args.shape, AutoTokenizer.from_pretrained(args.tokenizer), device)
    layers = resolve_layers(LAYERS, loaded.n_layers)
    items = make_items(loaded.tokenizer, args.n, seed=0)
    if device == "cuda" and args.peak_tflops is None:
        from common import matmul_tflops

        args.peak_tflops = matmul_tflops()
        print(f"measured bf16 matmul: {args.peak_tflops:.0f} TFLOP/s", flush=True)
    elif args.peak_tflops is None:
        args.peak_tflops = float("nan")
    # Encoding cost on its own: encode_chat item by item vs the batched encode_items.
    sub = items[: min(len(items), 2000)]
    t0 = time.perf_counter()
    for it in sub:
        encode_chat(loaded.tokenizer, it.messages, chat=loaded.chat)
    serial_s = (time.perf_counter() - t0) * len(items) / len(sub)
    t0 = time.perf_counter()
    encoded_all = encode_items(loaded, items)
    batched_s = time.perf_counter() - t0
    print(
        f"encode {len(items)} prompts: item by item {serial_s:.2f}s (extrapolated from "
        f"{len(sub)}), encode_items {batched_s:.2f}s",
        flush=True,
    )
    real_tokens = sum(len(e.input_ids) for e in encoded_all)
    warm = items[:4]
    naive_capture(loaded, warm, layers, 4)
    with tempfile.TemporaryDirectory() as tmp:  # warm-up of the capture path, untimed
        capture_to_disk(loaded, items[:64], layers, Path(tmp) / "w", progress=False)

    def timed(fn) -> tuple[float, float]:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        return time.perf_counter() - t, mem

    base_items = items[: args.baseline_n] if args.baseline_n else items
    base_tokens = sum(
        len(encode_chat(loaded.tokenizer, it.messages, chat=True).input_ids) for it in base_items
    )
    base_s, base_mem = timed(lambda: naive_capture(loaded, base_items, layers, args.batch_size))
    flops_per_token = 2 * layer_params(loaded.model, max(layers))
    runs = [
        (
            "baseline: output_hidden_states, unsorted",
            len(base_items),
            base_tokens,
            base_s,
            base_mem,
            "",
        )
    ]
    variants = [(int(b), False) for b in args.max_tokens.split(",")]
    if args.compile:
        variants += [(int(b), True) for b in args.max_tokens.split(",")]
    for budget, compiled in variants:
        if compiled and not getattr(loaded.model, "_bench_compiled", False):
            from llmlab.fused import compile_elementwise

            t0 = time.perf_counter()
            compile_elementwise(loaded.model)
            loaded.model._bench_compiled = True
            with tempfile.TemporaryDirectory() as tmp:  # compiles here, untimed
                capture_to_disk(loaded, items[:64], layers, Path(tmp) / "w", progress=False)
                capture_to_disk(loaded, items[-64:], layers, Path(tmp) / "w2", progress=False)
            print(f"compile + warm-up: {time.perf_counter() - t0:.1f}s", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            rss0 = _rss_gib()
            ours_s, ours_mem = timed(
                lambda budget=budget, tmp=tmp: capture_to_disk(
                    loaded,
                    items,
                    layers,
                    Path(tmp) / "acts",
                    batch_size=args.batch_size * 16,
                    max_tokens_per_batch=budget,
                    progress=False,
                )
            )
            runs.append(
                (
                    f"llmlab capture_to_disk, <= {budget} tokens/batch"
                    + (", norms + MLP compiled" if compiled else ""),
                    len(items),
                    real_tokens,
                    ours_s,
                    ours_mem,
                    f"{_rss_gib() - rss0:+.2f} (max {_max_rss_gib():.2f})",
                )
            )
        print(runs[-1], flush=True)
    if device == "cuda" and args.forward_ref:
        r, ell = (int(x) for x in args.forward_ref.lower().split("x"))
        ids = torch.randint(100, 30000, (r, ell), device=device)
        from llmlab.hooks import record_layers

        def bare() -> None:
            with torch.no_grad(), record_layers(loaded.layers, [max(layers)], True):
                loaded.model(input_ids=ids, use_cache=False)

        bare()
        secs = min(timed(bare)[0] for _ in range(3))
        runs.append(
            (f"reference: bare stopped forward, one {r} x {ell} batch, best of 3", r, r * ell,
             secs, torch.cuda.max_memory_allocated() / 2**30, "")
        )  # fmt: skip
    base_tps = base_tokens / base_s
    rows = []
    for name, n_items, toks, secs, mem, rss in runs:
        tps = toks / secs
        row = {
            "method": name,
            "device": device_name(),
            "model": loaded.name,
            "prompts": n_items,
            "real tokens": toks,
            "layers": len(layers),
            "seconds": secs,
            "tokens/s": tps,
            "ratio": tps / base_tps,
        }
        if device == "cuda":
            row["MFU %"] = 100 * tps * flops_per_token / (args.peak_tflops * 1e12)
            row["peak GiB"] = mem
        row["host RSS GiB (change, max)"] = rss
        rows.append(row)
    if args.profile and device == "cuda":
        from common import profile_top

        from llmlab.activations import capture_batch

        enc = sorted(encoded_all, key=lambda e: -len(e.input_ids))
        budget = int(args.max_tokens.split(",")[0])
        mid = len(enc) // 2
        n = max(1, min(args.batch_size * 16, budget // len(enc[mid].input_ids)))
        b = collate(enc[mid : mid + n], loaded.tokenizer.pad_token_id, padding_side="right")
        print(f"profile: one batch {tuple(b.input_ids.shape)}", flush=True)
        print(profile_top(lambda: capture_batch(loaded, b, layers, ["prompt_last"])), flush=True)
    for r in rows:
        r["peak TFLOP/s (measured)"] = args.peak_tflops
    report(f"Activation capture ({args.shape}, {device})", rows, append=not args.no_append)


if __name__ == "__main__":
    main()
