"""benchmarks/bench_persona_memory.py measures the preset's own training config."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "bench_persona_memory.py"
    spec = importlib.util.spec_from_file_location("bench_persona_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # its `from common import ...`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_config_is_the_presets_with_only_the_run_length_changed(bench):
    preset = bench.preset_train_config(
        ROOT / "configs" / "persona_paper.yaml", ROOT / "params.yaml"
    )
    assert (preset.rank, preset.alpha, preset.per_device_batch_size) == (8, 16.0, 8)
    assert (preset.effective_batch_size, preset.max_length) == (128, 2048)
    assert preset.gradient_checkpointing is True and preset.packing is True
    assert preset.hook_max_new_tokens == 64

    cfg = bench.bench_config(preset, steps=3, accum=2)
    assert (cfg.max_steps, cfg.epochs, cfg.effective_batch_size) == (3, None, 16)
    assert (cfg.eval_every, cfg.save_every, cfg.seed) == (None, None, 0)
    changed = {k for k, v in cfg.model_dump().items() if v != preset.model_dump()[k]}
    assert changed == {
        "epochs", "max_steps", "effective_batch_size", "eval_every", "save_every",
        "keep_eval_adapters", "seed",
    }  # fmt: skip


def test_changed_config_is_validated(bench):
    preset = bench.preset_train_config(
        ROOT / "configs" / "persona_paper.yaml", ROOT / "params.yaml"
    )
    with pytest.raises(ValueError, match="max_steps"):
        bench.bench_config(preset, steps=0, accum=2)
