"""Shared benchmark helpers: models of real shapes, realistic prompt lengths, result tables."""

from __future__ import annotations

import datetime as dt
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).with_name("RESULTS.md")

# Real architectures' shapes; weights are random (speed does not depend on them).
SHAPES = {
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
    # a few-MB model of the same architecture, for checking the scripts on a CPU
    "tiny": dict(
        hidden_size=64,
        intermediate_size=224,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
    ),
    "qwen2.5-32b": dict(
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
    ),
}


def device_name() -> str:
    """Return a short description of the device the benchmark runs on."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def prompt_lengths(n: int, seed: int, low: int = 20, high: int = 1000) -> list[int]:
    """Return n prompt lengths with a long tail (log-normal, clipped to [low, high])."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=np.log(120), sigma=0.8, size=n)
    return [int(x) for x in np.clip(raw, low, high)]


def random_shape_model(shape: str, dtype: torch.dtype, device: str):
    """Return a randomly initialised Llama-architecture model of a named real shape."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if shape.startswith("qwen"):  # Qwen2 layers: biases on q/k/v, untied head
        cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, tie_word_embeddings=False)
    else:
        cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def random_loaded(
    shape: str, tokenizer, device: str | torch.device, dtype: torch.dtype | None = None
):
    """Return a LoadedModel around a random model of a named shape (bf16 on GPU, fp32 on CPU)."""
    from llmlab.models import LoadedModel, decoder_layers

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = random_shape_model(shape, dtype, str(device))
    return LoadedModel(
        model, tokenizer, shape, True, len(decoder_layers(model)), model.config.hidden_size,
        device, dtype,
    )  # fmt: skip


def markdown_table(rows: list[dict[str, object]]) -> str:
    """Return rows as a markdown table (columns from the first row)."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def report(title: str, rows: list[dict[str, object]], append: bool = True) -> None:
    """Print the table and append it, with date and command, to benchmarks/RESULTS.md."""
    table = markdown_table(rows)
    print(f"\n## {title}\n\n{table}\n")
    if append:
        cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        with open(RESULTS, "a", encoding="utf-8") as fh:
            fh.write(f"\n## {title}\n\n{stamp} on {device_name()}: `{cmd}`\n\n{table}\n")


def profile_top(fn, n: int = 15) -> str:
    """Return the profiler's table of the n most expensive CUDA kernels of one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=n, max_name_column_width=60
    )


def matmul_tflops(n: int = 8192, reps: int = 50, trials: int = 5) -> float:
    """Return the measured bf16 matmul rate (TFLOP/s) of an n x n x n product on random data.

    About half a second of products first (clocks settle), then the best of `trials` timings
    of `reps` products each, so the ceiling is not understated by a cold start.
    """
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(300):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12)
    return best
