"""End to end: the preferences stages under `dvc repro` on tiny models, checked via the metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvc_repo import ROOT, make_repo, repro

TINY = {
    "train": {"n_tasks": 60, "batch_size": 40, "edge_budget": 0.4},
    "eval": {"n_tasks": 36, "batch_size": 30, "edge_budget": 0.5},
    "fit": {"reliability_splits": 2},
    # A tiny random model spreads its next token over the vocabulary: no A/B mass to speak of.
    "elicitation": {"min_mass": 0.0},
    "activations": {"layers": [0.5, 0.9]},
    "probes": {"alpha_sweep_size": 5, "n_boot": 100},
    "ood": {
        "kinds": ["category", "competing"],
        "n_targets": 1,
        "n_comparisons": 2,
        "n_boot": 100,
    },
}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return base with nested keys of `over` replaced (params must keep every key DVC tracks)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def test_preferences_pipeline_end_to_end(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    section = merged(yaml.safe_load((ROOT / "params.yaml").read_text())["preferences"], TINY)
    repo = make_repo(tmp_path, tiny_dirs["llama"], overrides={"preferences": section})
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"]["tiny"]["base_model"] = "tiny_base"
    params["models"]["tiny_base"] = {
        "source": "local",
        "path": str(tiny_dirs["qwen2"]),
        "chat": False,
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repro(repo, "preferences_report")

    m = json.loads((repo / "data/preferences/results.json").read_text())
    assert m["model"] == "tiny"
    assert m["measure"]["train"]["n_tasks"] == 60 and m["measure"]["eval"]["n_tasks"] == 36
    assert m["measure"]["train"]["n_edges"] >= 60
    assert m["measure"]["train"]["n_random_pairs"] == 40
    assert m["measure"]["eval"]["random_pair_accuracy"] is not None
    assert m["measure"]["train"]["n_low_mass"] == 0
    assert 0 <= m["measure"]["eval"]["sample_agreement"] <= 1
    assert set(m["hoo"]) == {"instruct", "base", "content"}
    assert m["hoo"]["content"]["label"] == "all-MiniLM-L6-v2"
    assert m["hoo"]["instruct"]["held_r"]["n_folds"] == 12
    assert -1 <= m["probes"]["heldout_r"]["value"] <= 1 and m["probes"]["shuffled_r"] is not None
    ood = m["ood"]
    assert ood["all_prompts"]["n_groups"] == 12 + 16  # category groups + two per competing prompt
    assert ood["all_prompts"]["n_tasks"] == 2 * 28  # one target and one off-target per group
    # Half of each kind's prompts (a competing pair counted once) choose the layer.
    assert ood["heldout"]["n_groups"] == ood["select"]["n_groups"] == 6 + 8
    assert ood["heldout"]["competing_flip_sign_agreement"] is not None
    assert ood["layer_choice"] == "select"
    headline = json.loads((repo / "metrics/preferences.json").read_text())
    assert headline["ood_pearson"]["value"] == pytest.approx(
        ood["heldout"]["pearson"]["r"], abs=1e-4
    )
    for f in ("hoo.png", "ood.png", "probes_layers.png"):
        assert (repo / "plots/preferences" / f).stat().st_size > 1000
    train = (repo / "data/preferences/split/train_ids.txt").read_text().split()
    evals = (repo / "data/preferences/split/eval_ids.txt").read_text().split()
    assert not set(train) & set(evals)
    utilities = (repo / "data/preferences/fit/train/utilities.csv").read_text().splitlines()
    assert utilities[0] == "task_id,topic,mu,sigma,n_comparisons" and len(utilities) == 61
    assert "held-out r" in (repo / "metrics/preferences_report.md").read_text()
