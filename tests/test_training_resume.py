"""The resume work directory and the adapter output of llmlab.training, without a model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from llmlab.training import SteerSpec, TrainExample
from llmlab.training_output import CURVE_FILE, write_output
from llmlab.training_resume import (
    MONITOR_FILE,
    RESUME_FILE,
    checkpoint_step,
    examples_sha256,
    latest_checkpoint,
    partial_dir,
    prepare_work_dir,
)

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _checkpoint(work: Path, step: int, complete: bool = True) -> Path:
    ckpt = work / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    if complete:
        (ckpt / MONITOR_FILE).write_text("{}")
    return ckpt


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, complete=False)  # a kill before its monitor file
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert checkpoint_step(tmp_path / "checkpoint-10") == 10
    assert checkpoint_step(tmp_path / "checkpoint-x") is None
    assert latest_checkpoint(tmp_path / "missing") is None
    assert partial_dir(tmp_path / "adapter") == tmp_path / "adapter.partial"


def test_same_fingerprint_resumes_and_clears_leftovers(tmp_path: Path) -> None:
    work = partial_dir(tmp_path / "adapter")
    assert prepare_work_dir(work, {"config": 1}) is None
    assert json.loads((work / RESUME_FILE).read_text()) == {"config": 1}
    _checkpoint(work, 4)
    _checkpoint(work, 6, complete=False)
    (work / ".tmp-write").write_text("x")  # an interrupted atomic write
    stale = tmp_path / ".adapter.old.abcd1234"  # staging a kill left beside the output
    stale.mkdir()
    assert prepare_work_dir(work, {"config": 1}) == work / "checkpoint-4"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-4", RESUME_FILE]
    assert not stale.exists()


def test_changed_fingerprint_starts_fresh_and_names_the_field(tmp_path: Path, caplog) -> None:
    work = partial_dir(tmp_path / "adapter")
    prepare_work_dir(work, {"config": 1, "data_sha256": "a"})
    _checkpoint(work, 4)
    with caplog.at_level(logging.WARNING):
        assert prepare_work_dir(work, {"config": 1, "data_sha256": "b"}) is None
    assert "starting fresh" in caplog.text and "data_sha256" in caplog.text
    assert sorted(p.name for p in work.iterdir()) == [RESUME_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.partial"]


def test_examples_digest_follows_every_training_field() -> None:
    base = TrainExample(CHAT)
    vec = torch.ones(4)
    variants = [
        TrainExample(CHAT, loss_tokens=1),
        TrainExample(CHAT, group="poison"),
        TrainExample(CHAT, no_grad_prefix=2),
        TrainExample(CHAT, steer=SteerSpec(vec, 2.0, (1,))),
        TrainExample(CHAT, steer=SteerSpec(vec * 2, 2.0, (1,))),
        TrainExample(CHAT, steer=SteerSpec(vec, 2.0, (1,), span=(0, 3))),
    ]
    digests = {examples_sha256([ex]) for ex in [base, *variants]}
    assert len(digests) == 1 + len(variants)
    assert examples_sha256([TrainExample(list(CHAT))]) == examples_sha256([base])


class _Adapter:
    """Stands in for a PeftModel: writes one weights file and a model card."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def save_pretrained(self, path: Path, safe_serialization: bool) -> None:
        assert safe_serialization
        (Path(path) / "adapter_model.safetensors").write_text(self.tag)
        (Path(path) / "README.md").write_text("template card")


def test_output_replaces_the_old_adapter_whole(tmp_path: Path) -> None:
    out = tmp_path / "models" / "adapter"
    curve: list[dict[str, Any]] = [{"step": 1, "loss": 2.0}]
    write_output(out, _Adapter("old"), {"steps": 1}, curve)
    write_output(out, _Adapter("new"), {"steps": 2}, curve + [{"step": 2, "loss": 1.5}])
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_model.safetensors",
        CURVE_FILE,
        "llmlab_adapter.json",
    ]
    assert (out / "adapter_model.safetensors").read_text() == "new"
    assert json.loads((out / "llmlab_adapter.json").read_text())["steps"] == 2
    assert json.loads((out / CURVE_FILE).read_text())[-1] == {"step": 2, "loss": 1.5}
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]  # no staging left


def test_output_failure_leaves_the_old_adapter(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    write_output(out, _Adapter("old"), {"steps": 1}, [])

    class Broken(_Adapter):
        def save_pretrained(self, path: Path, safe_serialization: bool) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_output(out, Broken("new"), {"steps": 2}, [])
    assert (out / "adapter_model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
