"""dvclive curves of LoRA training: every curve value, written while the run goes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import make_params

from llmlab.live import LiveCurves, live_dir
from llmlab.models import load_model
from llmlab.training import LoraTrainConfig, TrainExample, train_lora


def tsv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_live_dir_follows_the_adapter_under_models(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert live_dir("models/persona/adapter") == Path("dvclive/persona/adapter")
    assert live_dir(tmp_path / "models/introspection/vague") == Path("dvclive/introspection/vague")
    assert live_dir(tmp_path / "elsewhere/adapter") is None
    assert live_dir("models") is None


def test_training_writes_every_curve_value_to_dvclive(tiny_dirs, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    loaded = load_model(make_params(tiny_dirs["llama"]))
    words = ["apple", "river", "stone", "cloud"]
    train = [
        TrainExample(
            [
                {"role": "user", "content": f"Say the word {w}."},
                {"role": "assistant", "content": f"{w} {w}"},
            ]
        )
        for w in words
    ]
    cfg = LoraTrainConfig(
        rank=4, dropout=0.0, lr=5e-3, epochs=None, max_steps=6, per_device_batch_size=4,
        effective_batch_size=4, log_every=2, eval_every=3, lr_scheduler="constant_with_warmup",
    )  # fmt: skip
    res = train_lora(
        loaded, train, cfg, Path("models/fam/adapter"), val=train,
        eval_hook=lambda model, step: {"hook_rate": step / 10},
    )  # fmt: skip
    live = tmp_path / "dvclive/fam/adapter"
    metrics = live / "plots/metrics"
    for key in ("loss", "val_loss", "hook_rate", "lr", "grad_norm"):
        want = [(r["step"], r[key]) for r in res.curve if r.get(key) is not None]
        got = [(int(r["step"]), float(r[key])) for r in tsv(metrics / f"{key}.tsv")]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key
    # Evaluations at steps 0, 3 and 6; losses every second step.
    assert [int(r["step"]) for r in tsv(metrics / "hook_rate.tsv")] == [0, 3, 6]
    assert [int(r["step"]) for r in tsv(metrics / "loss.tsv")] == [2, 4, 6]
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["loss"] == pytest.approx(res.curve[-1]["loss"], rel=1e-6)
    # Nothing of dvclive's own experiment machinery: no dvc.yaml, no report.
    assert not (live / "dvc.yaml").exists() and not list(live.glob("report.*"))


class _Rows:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def curve(self) -> list[dict]:
        return self.rows


class _State:
    is_world_process_zero = True
    global_step = 0
    max_steps = 4


def test_a_value_added_to_a_written_row_is_written_once(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    rows = _Rows()
    cb = LiveCurves(rows, "models/fam/run")
    rows.rows.append({"step": 0, "val_loss": 2.0})
    cb.on_train_begin(None, _State(), None)
    rows.rows.append({"step": 2, "loss": 1.5, "lr": None})
    cb.on_log(None, _State(), None)
    rows.rows[-1]["val_loss"] = 1.2  # the evaluation merged into the row after its loss
    rows.rows[-1]["grad_norm"] = float("nan")  # not finite: left out, as in curve.json
    cb.on_log(None, _State(), None)
    cb.on_train_end(None, _State(), None)
    metrics = tmp_path / "dvclive/fam/run/plots/metrics"
    assert [(r["step"], r["val_loss"]) for r in tsv(metrics / "val_loss.tsv")] == [
        ("0", "2.0"),
        ("2", "1.2"),
    ]
    assert [(r["step"], r["loss"]) for r in tsv(metrics / "loss.tsv")] == [("2", "1.5")]
    assert sorted(p.name for p in metrics.iterdir()) == ["loss.tsv", "val_loss.tsv"]
