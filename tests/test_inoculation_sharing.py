"""Inoculation stages that load the model restore from a pushed run-cache: cached outs only.

DVC cannot restore a `cache: false` out from a remote (its file is in git, not the remote),
so a stage with one re-runs on another machine. The GPU stages therefore write cached outs
only, and the CPU-only report stage draws the git-tracked plots from them.
"""

from __future__ import annotations

from typing import Any

import yaml
from dvc_repo import ROOT

GPU_STAGES = (
    "inoculation_data",
    "inoculation_direction",
    "inoculation_alignment",
    "inoculation_finetune",
    "inoculation_drift",
)


def _stages() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _outs(stage: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for kind in ("outs", "metrics", "plots"):
        for o in stage.get(kind, []):
            if isinstance(o, dict):
                ((path, opts),) = o.items()
                out[path] = opts or {}
            else:
                out[o] = {}
    return out


def _loads_model(stage: dict[str, Any]) -> bool:
    return "models" in stage.get("params", [])


def test_gpu_stages_have_cached_outs_only() -> None:
    stages = _stages()
    for name in GPU_STAGES:
        assert _loads_model(stages[name]), name
        uncached = [p for p, o in _outs(stages[name]).items() if o.get("cache") is False]
        assert not uncached, f"{name}: cache: false outs {uncached} cannot be restored"


def test_git_tracked_inoculation_plots_and_metrics_come_from_cpu_stages() -> None:
    stages = _stages()
    tracked = {
        path: name
        for name, st in stages.items()
        if name.startswith("inoculation_")
        for path, o in _outs(st).items()
        if o.get("cache") is False
    }
    assert tracked["metrics/inoculation.json"] == "inoculation_report"
    for path, name in tracked.items():
        # inoculation_smoke is the sanity check kept out of the run-cache on purpose.
        assert name == "inoculation_smoke" or not _loads_model(stages[name]), (path, name)
    # Every plot the GPU stages used to write is still drawn (by the report).
    for plot in ("alignment_by_layer", "loss_by_condition", "training_alignment",
                 "projection_shift_by_layer", "caps_shift_by_condition", "direction_separation",
                 "projection_vs_caps"):  # fmt: skip
        assert tracked[f"plots/inoculation/{plot}.json"] == "inoculation_report", plot
