"""Sharded capture across processes, checked against one process: run under a launcher.

    torchrun --nproc_per_node 2 benchmarks/check_sharded_capture.py --items 64 --compare  # CPU
    accelerate launch --multi_gpu --num_processes 2 benchmarks/check_sharded_capture.py \
        --shape llama-3.1-8b --tokenizer DIR --items 10000 --compare       # one process per GPU

Every process captures its shard of the prompts (llmlab.distributed.capture_sharded); process
0 merges them and, with --compare, recomputes the whole list alone and prints the largest
difference and both wall times.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_activations import LAYERS, make_items  # noqa: E402
from common import SHAPES, random_loaded  # noqa: E402

from llmlab.activations import capture_to_disk, load_activations  # noqa: E402
from llmlab.distributed import capture_sharded, process_rank, use_local_gpu  # noqa: E402
from llmlab.layers import resolve_layers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--tokenizer", default=".cache/bench_tokenizer")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--out", default=None, help="shared output directory (default: a temp dir)")
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--compare", action="store_true", help="process 0 also captures alone")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    rank, world, _ = process_rank()
    device = use_local_gpu()
    torch.manual_seed(0)  # same random weights in every process
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    loaded = random_loaded(args.shape, tok, device)
    layers = resolve_layers(LAYERS, loaded.n_layers)
    items = make_items(tok, args.items, seed=0)
    base = Path(args.out or tempfile.gettempdir()) / f"sharded-check-{args.shape}-{args.items}"
    kw = dict(batch_size=512, max_tokens_per_batch=args.max_tokens, progress=False)
    t0 = time.perf_counter()
    out = capture_sharded(loaded, items, layers, base / "acts", **kw)
    sharded_s = time.perf_counter() - t0
    print(f"rank {rank}/{world}: sharded capture of {len(items)} items done in {sharded_s:.1f}s",
          flush=True)  # fmt: skip
    if rank != 0 or not args.compare:
        return
    t0 = time.perf_counter()
    single = capture_to_disk(loaded, items, layers, base / "single", **kw)
    single_s = time.perf_counter() - t0
    diff = max(
        float(np.abs(load_activations(out, L).values - load_activations(single, L).values).max())
        for L in layers
    )
    print(f"{world} processes: {sharded_s:.1f}s; one process: {single_s:.1f}s "
          f"(x{single_s / sharded_s:.2f}); largest difference {diff:.2e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
