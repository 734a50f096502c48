"""The split stage (exclusions, hub sources) and the paper preset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from llmlab.params import parse_params
from llmlab.preferences import common as c
from llmlab.preferences import hub
from llmlab.preferences.tasks import load_tasks

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT / "data/preferences/tasks.jsonl"
TOPICS = ROOT / "data/preferences/topics.json"


def _run_split(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, tasks: dict, extra: dict | None = None
) -> None:
    """Run the split stage in `tmp` on the shipped pool; `extra`: further top-level params."""
    (tmp / "params.yaml").write_text(
        yaml.safe_dump(
            {
                **(extra or {}),
                "model": "fake",
                "models": {"fake": {"source": "local", "path": "/nonexistent"}},
                "preferences": {
                    "tasks": {
                        "pool": str(POOL),
                        "topics": str(TOPICS),
                        "topic_check": str(POOL.with_name("topic_check.jsonl")),
                        **tasks,
                    },
                    "train": {
                        "n_tasks": 120,
                        "n_samples": 1,
                        "batch_size": 10,
                        "convergence_threshold": 0.99,
                        "edge_budget": 1.0,
                    },
                    "eval": {
                        "n_tasks": 60,
                        "n_samples": 1,
                        "batch_size": 10,
                        "convergence_threshold": 0.99,
                        "edge_budget": 1.0,
                    },
                },
            }
        )
    )
    monkeypatch.chdir(tmp)
    monkeypatch.setattr(sys, "argv", ["split"])
    from llmlab.preferences.split import main
    from llmlab.stage import run_stage

    run_stage(main)


def test_split_stage_disjoint_and_excludes(tmp_path, monkeypatch) -> None:
    excluded = [t.id for t in load_tasks(POOL) if t.topic == "trivia"]
    (tmp_path / "exclude.txt").write_text("\n".join(excluded) + "\n")
    _run_split(tmp_path, monkeypatch, {"exclude_ids_file": "exclude.txt"})
    train, evals = c.read_ids(c.IDS["train"]), c.read_ids(c.IDS["eval"])
    assert len(train) == 120 and len(evals) == 60
    assert not set(train) & set(evals) and not (set(train) | set(evals)) & set(excluded)
    pool = c.load_pool()
    assert len(pool) == 940 and c.split_ids("train") == train


def test_split_stage_hub_required_unreachable(tmp_path, monkeypatch, capsys) -> None:
    def unreachable(source: str, n: int, seed: int):
        raise RuntimeError(f"hub dataset {source} unreachable: offline")

    monkeypatch.setattr(hub, "hub_prompts", unreachable)
    with pytest.raises(SystemExit):
        _run_split(tmp_path, monkeypatch, {"hub": {"gsm8k": 5}, "hub_required": True})
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "error: preferences.tasks (hub or sources): hub dataset gsm8k unreachable"
    )
    assert not (tmp_path / c.SPLIT).exists()


def test_hub_tasks_get_topics(monkeypatch) -> None:
    fake = {
        "gsm8k": [("gsm8k-1", "Tom has 3 apples and buys 4 more. How many apples does he have?")],
        "alpaca": [
            ("alpaca-7", "Write a Python function that sorts a list of numbers."),
            ("alpaca-8", "Translate 'good morning' into French and German."),
        ],
    }
    monkeypatch.setattr(hub, "hub_prompts", lambda source, n, seed: fake[source][:n])
    labelled = [t for t in load_tasks(POOL) if t.origin == "handwritten"][::3]
    names = sorted({t.topic for t in labelled})
    tasks, counts = hub.hub_tasks({"gsm8k": 1, "alpaca": 2}, 0, labelled, names)
    assert counts == {"source": 1, "judge": 0, "minilm": 2}
    got = {t.id: (t.topic, t.origin) for t in tasks}
    assert got["gsm8k-1"] == ("math", "gsm8k")
    assert got["alpaca-7"] == ("coding", "alpaca")
    assert got["alpaca-8"] == ("translation", "alpaca")


def test_paper_preset_is_valid_params() -> None:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    preset = yaml.safe_load((ROOT / "configs/preferences_paper.yaml").read_text())
    for key, value in preset.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, dict) and isinstance(base[key].get(sub), dict):
                    base[key][sub] = {**base[key][sub], **v}
                else:
                    base[key][sub] = v
        else:
            base[key] = value
    params = parse_params(base)
    cfg = params.section("preferences")
    assert params.family_model("preferences") == "gemma-3-27b-it"
    assert params.for_family("preferences").model_entry.base_model == "gemma-3-27b-pt"
    assert (cfg.train.n_tasks, cfg.eval.n_tasks) == (10000, 3000)
    assert cfg.train.convergence_threshold == 0.995 and cfg.eval.convergence_threshold == 0.99
