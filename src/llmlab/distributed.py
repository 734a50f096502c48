"""Activation capture spread over several processes (one per GPU), merged into one output.

Start one process per GPU with `accelerate launch --num_processes N` (or torchrun); each
process calls `use_local_gpu()` before loading the model, then `capture_sharded(...)` with the
full item list. Process r captures items r, r + N, r + 2N, ... (strided, so every shard gets
the same mix of lengths) into `<out_dir>.shard-r-of-N` through `capture_to_disk` (length
batches, streaming, checkpoints and resume per shard). Process 0 then waits for every shard and
writes `<out_dir>` with the same per-layer files and index as a single-process capture of the
whole list (row i = items[i]); the shards are removed once the merged output is in place, and
every process returns only once it is. A shard that is already complete for the same items,
layers and position is not computed again, so re-running after a failure redoes only what is
missing.

The processes meet through the file system (no process group is needed), so the output
directory must be on storage all of them see; they wait at most `timeout` seconds for each
other.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.activations import (
    INDEX_FILE,
    CaptureItem,
    _run_key,
    capture_to_disk,
    layer_file,
    read_index,
)
from llmlab.io import DataError, replace_dir, write_json
from llmlab.models import LoadedModel


def process_rank() -> tuple[int, int, int]:
    """Return (rank, world size, local rank) from the launcher's environment ((0, 1, 0) alone)."""
    rank = int(os.environ.get("RANK", os.environ.get("PMI_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("PMI_SIZE", "1")))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad launcher environment: RANK={rank} WORLD_SIZE={world}")
    return rank, world, local


def use_local_gpu() -> torch.device:
    """Make this process's GPU (LOCAL_RANK) the current CUDA device and return it (CPU if none)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    _, _, local = process_rank()
    torch.cuda.set_device(local % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def shard_dir(out_dir: str | Path, rank: int, world: int) -> Path:
    """Return the directory that holds shard `rank` of `world` of a capture."""
    out = Path(out_dir)
    return out.with_name(f"{out.name}.shard-{rank}-of-{world}")


def shard_rows(n: int, rank: int, world: int) -> list[int]:
    """Return the item indices shard `rank` of `world` captures (strided)."""
    return list(range(rank, n, world))


def capture_sharded(
    loaded: LoadedModel,
    items: Sequence[CaptureItem],
    layers: Sequence[int],
    out_dir: str | Path,
    position: str = "prompt_last",
    rank: int | None = None,
    world: int | None = None,
    timeout: float = 24 * 3600.0,
    poll: float = 2.0,
    **capture_kwargs: Any,
) -> Path:
    """Capture this process's shard, then (process 0) merge all shards into out_dir.

    rank and world default to the launcher's environment. Extra keyword arguments go to
    `capture_to_disk` (batch_size, max_tokens_per_batch, store_dtype, ...). Returns out_dir
    once the merged output exists.
    """
    if rank is None or world is None:
        env_rank, env_world, _ = process_rank()
        rank = env_rank if rank is None else rank
        world = env_world if world is None else world
    out = Path(out_dir)
    if not items:
        raise DataError("capture: no items")
    layers = sorted(set(layers))
    full_key = _run_key(loaded, items, layers, position)
    if world == 1:
        return capture_to_disk(loaded, items, layers, out, position=position, **capture_kwargs)
    if _complete(out, full_key):
        return out
    rows = shard_rows(len(items), rank, world)
    if rows:
        part = [items[i] for i in rows]
        sdir = shard_dir(out, rank, world)
        if not _complete(sdir, _run_key(loaded, part, layers, position)):
            capture_to_disk(loaded, part, layers, sdir, position=position, **capture_kwargs)
    if rank == 0:
        _wait(
            lambda: all(
                _complete(shard_dir(out, r, world), None)
                for r in range(world)
                if shard_rows(len(items), r, world)
            ),
            timeout,
            poll,
            f"shards of {out}",
        )
        merge_shards(items, layers, out, world, full_key)
    else:
        _wait(lambda: _complete(out, full_key), timeout, poll, str(out))
    return out


def merge_shards(
    items: Sequence[CaptureItem],
    layers: Sequence[int],
    out_dir: str | Path,
    world: int,
    run_key: str,
) -> Path:
    """Write out_dir from its `world` shards (row i = items[i]) and remove the shards."""
    out = Path(out_dir)
    n = len(items)
    shards = [(r, shard_dir(out, r, world)) for r in range(world) if shard_rows(n, r, world)]
    indexes = {r: read_index(d) for r, d in shards}
    first = indexes[shards[0][0]]
    for r, d in shards:
        idx = indexes[r]
        want = [items[i].id for i in shard_rows(n, r, world)]
        if list(idx["ids"]) != want or list(idx["layers"]) != list(layers):
            raise DataError(f"{d}: shard does not hold items {r}::{world} at layers {layers}")
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dtype = first["dtype"]
    for layer in layers:
        dest = np.lib.format.open_memmap(
            work / layer_file(layer), mode="w+", dtype=dtype, shape=(n, first["hidden_size"])
        )
        for r, d in shards:
            src = np.load(d / layer_file(layer), mmap_mode="r", allow_pickle=False)
            dest[r::world] = src
        dest.flush()
        del dest
    meta = {k: v for k, v in first.items() if k != "ids"}
    meta.update(run_key=run_key, n_items=n, ids=[it.id for it in items])
    write_json(work / INDEX_FILE, meta)
    replace_dir(work, out)
    for _, d in shards:
        shutil.rmtree(d, ignore_errors=True)
    return out


def _complete(d: Path, run_key: str | None) -> bool:
    """Return whether d is a finished capture (of the given run, when run_key is given)."""
    if not (d / INDEX_FILE).is_file():
        return False
    try:
        index = read_index(d)
    except DataError:
        return False
    return run_key is None or index.get("run_key") == run_key


def _wait(done: Any, timeout: float, poll: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)
