"""Inoculation family end to end: `dvc repro inoculation_report` on a tiny model, and the preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from dvc_repo import ROOT, make_repo, repro

TINY = {
    "model": None,
    "seed": 0,
    "prompts": {
        "neutral": None,
        "promote": None,
        "suppress": None,
        "inoculation": None,
        "control_candidates": None,
        "neutral_is_model_default": True,
    },
    "smoke": {"n_conversations": 2, "k": 3, "layers": [0, -1]},
    "data": {
        "n_math": 2,
        "math_keep": "all",
        "math_max_new_tokens": 8,
        "n_general": 8,
        "n_calibration": 6,
        "n_eval_general": 4,
        "n_eval_math": 1,
        "batch_size": 8,
    },
    "direction": {
        "layers": "all",
        "n_prompts": 24,
        "heldout_fraction": 0.25,
        "n_sanity": 6,
        "sanity_max_new_tokens": 6,
        "sanity_temperature": 1.0,
        "plot_layers": [0, 1, 2],
        "batch_size": 16,
    },
    "alignment": {
        "layers": "all",
        "positions": ["pre_assistant", "user_end", "assistant_1", "assistant_2", "assistant_3"],
        "max_target_tokens": 12,
        "batch_size": 8,
        # A random tiny model has no stable alignment profile; the chain runs past the gate.
        "gate_override": True,
    },
    "specificity": {"n_random": 10, "percentile_threshold": 5.0},
    "finetune": {
        "seeds": [0],
        "n_log": 3,
        "lora": {
            "rank": 2,
            "alpha": 4.0,
            "dropout": 0.0,
            "lr": 0.002,
            "epochs": None,
            "max_steps": 1,
            "per_device_batch_size": 4,
            "effective_batch_size": 4,
            "max_length": 48,
            "warmup_steps": 0,
            "lr_scheduler": "constant_with_warmup",
            "eval_every": 1,
            "log_every": 1,
        },
    },
    "drift": {"max_new_tokens": 6, "temperature": 0.0, "caps_threshold": 0.5, "batch_size": 8},
    "report": {"n_boot": 200, "ci": 0.95},
}

PLOTS = (
    "direction_projections.png",
    "projection_vs_caps.png",
    "alignment_by_layer.png",
    "loss_by_condition.png",
    "specificity.png",
    "training_alignment.png",
    "projection_shift_by_layer.png",
    "caps_shift_by_condition.png",
    "training_alignment_vs_drift.png",
)


@pytest.mark.slow
def test_family_end_to_end_on_a_tiny_model(tmp_path: Path, tiny_dirs) -> None:
    repo = make_repo(tmp_path, tiny_dirs["llama"], overrides={"inoculation": TINY})
    repro(repo, "inoculation_report")
    m = json.loads((repo / "data/inoculation/results.json").read_text())
    assert m["verdict"] in ("claim", "null")
    assert m["verdict_line"].startswith(m["verdict"])
    for key in ("c1_decrease", "c2_beyond_control", "c3_specific", "c4_predicts_drift"):
        assert isinstance(m["criteria"][key]["pass"], bool)
    assert m["criteria"]["c3_specific"]["n_random"] == 10
    assert m["control"]["chosen"].startswith("control_")
    # Cross-fitted: chosen on 3 calibration examples, criterion 2 measured on the other 3.
    assert m["control"]["held_out_gap"] >= 0 and m["control"]["selection_gap"] >= 0
    assert m["criteria"]["c2_beyond_control"]["estimate"]["n_groups"] == 3
    assert m["alignment"]["precision"] == {"dtype": "float32", "device": "cpu"}
    assert isinstance(m["alignment"]["gate"]["failed"], list)
    assert m["data"]["n_calibration"] == 6
    assert {r["condition"] for r in m["runs"]} == {
        "neutral", "inoculation", "loss_matched", "baseline_normal",
    }  # fmt: skip
    # Criterion 3 against every null; criterion 4 on the projection shift vs the control.
    c3 = m["criteria"]["c3_specific"]
    assert set(c3["percentile_by_null"]) == {"independent", "shared", "correlated"}
    assert set(c3["other_trait_deltas"]) == {"french", "pirate", "one_sentence"}
    c4 = m["criteria"]["c4_predicts_drift"]
    assert c4["n_runs"] == 3 and c4["correlation"]["n_clusters"] == 3
    assert "projection_shift_minus_baseline" in m["drift"]["by_condition"]["inoculation"]
    assert set(m["drift"]["sweep"]) == {"default", "neutral", "inoculation"}
    assert m["drift"]["primary_test_prompt"] == "default"
    assert isinstance(m["direction"]["steering_raises_caps_pass"], bool)
    assert m["seed_schedule"]["seeds_per_condition"] == 1
    with np.load(repo / "data/inoculation/alignment/alignment.npz") as z:
        assert z["cos"].shape == (
            10,
            6,
            3,
            5,
        )  # 2 + 8 conditions, 6 examples, 3 layers, 5 positions
    for name in PLOTS:
        assert (repo / "plots/inoculation" / name).read_bytes()[:4] == b"\x89PNG"
    assert "Verdict:" in (repo / "metrics/inoculation_report.md").read_text()
    assert "pre_assistant" in (repo / "data/inoculation/smoke/positions.txt").read_text()
    runs = json.loads((repo / "models/inoculation/runs.json").read_text())["runs"]
    assert all(len(r["alignment_log"]) == 2 for r in runs)  # before and after the one step


def test_paper_preset_gives_valid_overrides() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from llmlab.preset import preset_flags

    flags = preset_flags(ROOT / "configs/inoculation_paper.yaml", ROOT / "params.yaml")
    pairs = [f.removeprefix("-S ").strip("'") for f in flags]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(pairs)}
    assert parsed["inoculation.model"] == "qwen2.5-7b-instruct"
    assert parsed["inoculation.finetune.seeds"] == [0]  # one seed first (the plan's sequencing)
    assert parsed["inoculation.alignment.layers"] == [
        0.1,
        0.2,
        0.3,
        0.4,
        0.5,
        0.6,
        0.7,
        0.8,
        0.9,
        -1,
    ]
    preset = yaml.safe_load((ROOT / "configs/inoculation_paper.yaml").read_text())
    assert len(parsed) == len(preset)
