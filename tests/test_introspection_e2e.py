"""The introspection family end to end with `dvc repro` on a tiny random model."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from dvc_repo import ROOT, make_repo, repro

TINY = {
    "vectors": {
        "n_train_vectors": 8,
        "n_heldout_vectors": 4,
        "n_concepts": 20,
        "n_norm_prompts": 8,
        "span_layers": [0, -1],
    },
    "data": {"n_train": 8, "n_val": 4, "strengths": [1.0, 4.0]},
    "train": {
        "lora": {
            "lr": 0.001,
            "epochs": 1.0,
            "per_device_batch_size": 4,
            "effective_batch_size": 4,
            "warmup_steps": 0,
            "eval_every": 1,
            "log_every": 1,
            "max_length": 128,
            "seed": 42,
        },
        "val_batch_size": 8,
    },
    "eval": {
        "batch_size": 32,
        "b1": {"n_per_set": 4},
        "n_food_trials": 4,
        "b3": {"n_questions": 2, "n_samples": 2, "max_new_tokens": 4},
        "b4": {"n_per_dataset": 4, "object_max_new_tokens": 4, "hypothetical_max_new_tokens": 3},
        "b5": {
            "n_prompts": 5,
            "n_samples": 4,
            "answer_max_new_tokens": 2,
            "report_max_new_tokens": 6,
        },
        "b6": {"n_concepts": 20, "max_new_tokens": 3, "models": ["base", "original"]},
        "b7": {"n_trials": 3, "models": ["base", "original"]},
    },
    "phase_c": {"enabled": "always", "n_train": 6},
    "judge_max_new_tokens": 1,
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return base with over's values written in, recursing into mappings."""
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


@pytest.mark.slow
def test_dvc_repro_runs_the_family(tmp_path, tiny_dirs):
    # Every key the stages declare must exist in params.yaml, so the tiny sizes are merged
    # into the project's section rather than replacing it.
    project = yaml.safe_load((ROOT / "params.yaml").read_text())["introspection"]
    repo = make_repo(
        tmp_path,
        tiny_dirs["llama"],
        overrides={
            "introspection": deep_merge(project, TINY),
            "judge": {"backend": "local", "max_tokens": 2, "cache_dir": None},
        },
    )
    repro(repo, "introspection_report")
    metrics = json.loads((repo / "data" / "introspection" / "results.json").read_text())
    assert "clipped to [0.01, 0.99]" in metrics["d_prime_rule"]
    assert set(metrics["b1_detection"]) == {"base", "original", "vague", "r1_minimal"}
    for m in metrics["b1_detection"].values():
        assert set(m) == {"in_distribution", "heldout", "concept"}
        assert m["heldout"]["n"] == 4
    assert set(metrics["training"]) == {
        "original",
        "vague",
        "r1_minimal",
        "food_control",
        "flipped_labels",
    }
    assert metrics["training"]["r1_minimal"]["rank"] == 1
    assert metrics["training"]["r1_minimal"]["alpha"] == 2.0
    # The anchor's 75 questions: 46 about the model, 29 controls.
    assert metrics["b2_p_yes"]["key_comparisons"]["vague_minus_original_self"]["n_groups"] == 46
    assert metrics["b2_p_yes"]["original"]["control_shift_vs_base"]["n_groups"] == 29
    assert "self_referential_p_yes_absolute" in metrics["b2_p_yes"]["base"]
    assert set(metrics["b6_concepts"]) == {"base", "original"}
    assert metrics["b3_yes_no_intrusion"]["base"]["n"] == 4  # 2 questions x 2 samples
    assert metrics["phase_c"]["trained"] is True
    assert len(metrics["success"]) == 6
    assert all(s["met"] in (True, False, None) for s in metrics["success"])
    for model in ("base", "food_control"):
        b5 = metrics["b5_calibration"][model]
        assert b5["n_parsed"] + b5["n_unparseable"] == 5
        assert b5["kl"] is not None  # unparseable reports are scored as failures
    d = metrics["b1_detection"]["original"]["heldout"]["d_prime"]
    assert d["lo"] <= d["d_prime"] <= d["hi"]
    assert metrics["model"] == "tiny"
    report = (repo / "metrics" / "introspection_report.md").read_text()
    assert "What success looks like" in report and "Flipped-labels variant learned" in report
    assert "Model: `tiny`." in report
    for png in ("detection", "p_yes_shift", "selfpred", "kl", "val_accuracy"):
        assert (repo / "plots" / "introspection" / f"{png}.png").stat().st_size > 0
    curve = json.loads((repo / "models/introspection/flipped_labels/curve.json").read_text())
    assert any("val_accuracy" in row for row in curve)
