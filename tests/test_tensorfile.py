"""The one tensor format (safetensors + JSON sidecar): round trips, foreign readers, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlab.io import DataError
from llmlab.tensorfile import load_tensors, save_tensors


def test_round_trip_numpy_and_torch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 8)).astype(np.float32)
    b = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    path = tmp_path / "v.safetensors"
    save_tensors(path, {"a": a, "b": b}, {"model": "m", "layers": [1, 2]}, kind="test.kind")
    arrays, meta = load_tensors(path, kind="test.kind", required=["a", "b"])
    assert np.array_equal(arrays["a"], a)
    assert arrays["b"].dtype == np.float32 and np.array_equal(arrays["b"], b.float().numpy())
    assert meta["layers"] == [1, 2] and meta["shapes"] == {"a": [3, 8], "b": [2, 3, 8]}


def test_files_open_without_llmlab(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = tmp_path / "dir.safetensors"
    save_tensors(path, {"directions": np.eye(2, 4)}, {"model": "org/m"}, kind="k")
    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"kind": "k", "model": "org/m"}
        assert f.get_tensor("directions").shape == (2, 4)
    assert json.loads((tmp_path / "dir.json").read_text())["kind"] == "k"


def test_refusals_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "v.safetensors"
    with pytest.raises(DataError, match="must end in .safetensors"):
        save_tensors(tmp_path / "v.npy", {"a": np.ones(2)}, {}, kind="k")
    with pytest.raises(DataError, match="non-finite"):
        save_tensors(path, {"a": np.array([1.0, np.nan])}, {}, kind="k")
    assert not path.exists()
    with pytest.raises(DataError, match=r"v\.safetensors: file not found"):
        load_tensors(path, kind="k")
    save_tensors(path, {"a": np.ones((2, 3))}, {}, kind="k")
    with pytest.raises(DataError, match=r"v\.json: kind 'k', expected 'other'"):
        load_tensors(path, kind="other")
    with pytest.raises(DataError, match=r"tensor 'b' missing"):
        load_tensors(path, kind="k", required=["b"])
    meta = json.loads((tmp_path / "v.json").read_text())
    meta["shapes"]["a"] = [3, 2]
    (tmp_path / "v.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"tensor 'a' has shape \[2, 3\], v\.json says \[3, 2\]"):
        load_tensors(path, kind="k")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="not a complete safetensors file"):
        load_tensors(path, kind="k")
