"""Sharded capture: shards merge into the same per-layer files as one process would write."""

from __future__ import annotations

import numpy as np
import pytest

import llmlab.distributed as dist_mod
from llmlab.activations import CaptureItem, capture_to_disk, load_activations, read_index
from llmlab.distributed import capture_sharded, process_rank, shard_dir, shard_rows


def _items(n):
    return [
        CaptureItem(f"it-{i}", [{"role": "user", "content": f"Item {i}: " + "word " * (i % 9)}])
        for i in range(n)
    ]


def _run_rank(loaded, items, out, rank, world):
    """Run one rank as its own process would; ranks > 0 stop waiting for the merge at once."""
    kw = dict(batch_size=4, progress=False, poll=0.01)
    if rank == 0:
        return capture_sharded(loaded, items, [0, 1], out, rank=0, world=world, timeout=5, **kw)
    with pytest.raises(TimeoutError):
        capture_sharded(loaded, items, [0, 1], out, rank=rank, world=world, timeout=0.05, **kw)
    return None


def test_sharded_capture_equals_single_process(tiny_models, tmp_path):
    loaded = tiny_models["llama"]
    items = _items(17)
    single = capture_to_disk(loaded, items, [0, 1], tmp_path / "one", batch_size=4, progress=False)
    out = tmp_path / "many"
    for rank in (2, 1):
        _run_rank(loaded, items, out, rank, 3)
        assert (shard_dir(out, rank, 3) / "index.json").is_file()
    assert not out.exists()
    assert _run_rank(loaded, items, out, 0, 3) == out
    assert not any(shard_dir(out, r, 3).exists() for r in range(3))
    a, b = read_index(single), read_index(out)
    assert b["ids"] == a["ids"] and b["layers"] == a["layers"] and b["run_key"] == a["run_key"]
    for layer in (0, 1):
        np.testing.assert_allclose(
            load_activations(out, layer).values,
            load_activations(single, layer).values,
            atol=1e-5,
            rtol=1e-5,
        )


def test_complete_shards_and_outputs_are_not_recomputed(tiny_models, tmp_path, monkeypatch):
    loaded = tiny_models["llama"]
    items = _items(5)
    out = tmp_path / "acts"
    _run_rank(loaded, items, out, 1, 2)
    calls = []
    real = dist_mod.capture_to_disk

    def counting(*a, **k):
        calls.append(len(a[1]))
        return real(*a, **k)

    monkeypatch.setattr(dist_mod, "capture_to_disk", counting)
    _run_rank(loaded, items, out, 1, 2)  # shard 1 is complete: nothing recomputed
    assert calls == []
    _run_rank(loaded, items, out, 0, 2)
    assert calls == [len(shard_rows(5, 0, 2))]
    _run_rank(loaded, items, out, 0, 2)  # merged output complete: nothing at all
    assert calls == [3]


def test_more_processes_than_items(tiny_models, tmp_path):
    loaded = tiny_models["llama"]
    items = _items(2)
    out = tmp_path / "acts"
    for rank in (3, 2, 1):
        _run_rank(loaded, items, out, rank, 4)
    _run_rank(loaded, items, out, 0, 4)
    assert read_index(out)["ids"] == ["it-0", "it-1"]


def test_process_rank_reads_the_launcher_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK", "PMI_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert process_rank() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_rank() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="launcher"):
        process_rank()
