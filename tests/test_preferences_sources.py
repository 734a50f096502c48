"""Task sources: local JSONL / CSV and Hugging Face datasets mixed into the pool."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmlab.io import DataError
from llmlab.preferences import common as c
from llmlab.preferences.config import TaskSource
from llmlab.preferences.sources import all_source_tasks, source_tasks


def test_presets_fill_fields_and_one_place_is_required() -> None:
    s = TaskSource(origin="alpaca", count=5, preset="alpaca")
    assert s.dataset == "tatsu-lab/alpaca" and s.filters == {"input": ""}
    assert TaskSource(origin="m", count=1, preset="math", config="geometry").config == "geometry"
    with pytest.raises(ValidationError, match="unknown source preset 'bailbench'"):
        TaskSource(origin="b", count=1, preset="bailbench")
    with pytest.raises(ValidationError, match="exactly one of dataset and path"):
        TaskSource(origin="x", count=1)
    with pytest.raises(ValidationError, match="exactly one of dataset and path"):
        TaskSource(origin="x", count=1, dataset="d", path="p.jsonl")


def test_local_jsonl_and_csv_with_filters_ids_and_dedup(tmp_path) -> None:
    rows = [
        {"uid": "a1", "text": "Write a short poem about the sea.", "lang": "en"},
        {"uid": "a2", "text": "Écris un poème sur la mer, s'il te plaît.", "lang": "fr"},
        {"uid": "a3", "text": "Too short", "lang": "en"},
        {"uid": "a4", "text": "Explain  how   tides work\nin two sentences.", "lang": "en"},
        {"uid": "a5", "text": "Write a short poem about the sea.", "lang": "en"},
    ]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = TaskSource(
        origin="mine", count=5, path=str(tmp_path / "mine.jsonl"), text_field="text",
        id_field="uid", filters={"lang": "en"},
    )  # fmt: skip
    got = source_tasks(src, 0, [])
    assert got == [
        ("mine-a1", "Write a short poem about the sea."),
        ("mine-a4", "Explain how tides work in two sentences."),
    ]
    assert source_tasks(src.model_copy(update={"count": 1}), 0, []) == got[:1]
    assert source_tasks(src, 0, ["write a short poem about the sea."]) == got[1:]
    (tmp_path / "other.csv").write_text(
        "prompt,kind\nList three uses of baking soda.,x\nName a river in Peru.,x\n"
    )
    csv_src = TaskSource(origin="csvs", count=2, path=str(tmp_path / "other.csv"))
    both = all_source_tasks([src, csv_src], 0, [])
    assert [o for o, _i, _p in both] == ["mine", "mine", "csvs", "csvs"]
    assert both[2][1] == "csvs-0"
    bad = TaskSource(origin="m", count=1, path=str(tmp_path / "mine.jsonl"), text_field="nope")
    with pytest.raises(DataError, match="field 'nope'"):
        source_tasks(bad, 0, [])
    missing = TaskSource(origin="m", count=1, path=str(tmp_path / "absent.jsonl"))
    with pytest.raises(DataError, match=r"sources\.m: .*absent\.jsonl is not a file"):
        source_tasks(missing, 0, [])


def test_hub_dataset_is_streamed_through_a_seeded_shuffle(monkeypatch) -> None:
    calls = {}

    class Stream:
        def __init__(self, rows):  # noqa: ANN001
            self.rows = rows

        def shuffle(self, seed, buffer_size):  # noqa: ANN001, ANN201
            calls["shuffle"] = (seed, buffer_size)
            return iter(self.rows)

    def load_dataset(name, config, split, revision, streaming):  # noqa: ANN001, ANN202
        calls["load"] = (name, config, split, revision, streaming)
        return Stream([{"problem": f"Solve problem number {k} of the set."} for k in range(9)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = TaskSource(origin="math", count=3, preset="math")
    got = source_tasks(src, 7, [])
    assert calls["load"] == ("EleutherAI/hendrycks_math", "algebra", "train", None, True)
    assert calls["shuffle"] == (7, 1000)
    assert [i for i, _p in got] == ["math-0", "math-1", "math-2"]


def test_split_stage_mixes_a_local_source_into_the_pool(tmp_path, monkeypatch) -> None:
    from test_preferences_split import _run_split

    import llmlab.preferences.topics as topics

    monkeypatch.setattr(
        topics, "minilm_topics", lambda texts, labelled, names: ["trivia"] * len(texts)
    )
    rows = [{"q": f"What is the name of famous landmark number {k}?"} for k in range(30)]
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"origin": "landmarks", "count": 25, "path": "extra.jsonl", "text_field": "q"}
    _run_split(tmp_path, monkeypatch, {"sources": [source]})
    pool = {r["id"]: r for r in map(json.loads, c.POOL.read_text().splitlines())}
    mine = [r for r in pool.values() if r["origin"] == "landmarks"]
    assert len(mine) == 25 and {r["topic"] for r in mine} == {"trivia"}
    report = json.loads((c.SPLIT / "topic_check.json").read_text())
    assert report["tasks_by_origin"] == {"landmarks": 25}
    assert report["source_topics_by_method"] == {"minilm": 25}
    assert report["agreement"]["n"] == 36
    train, evals = c.read_ids(c.IDS["train"]), c.read_ids(c.IDS["eval"])
    assert not set(train) & set(evals)


def wildchat_row(k: int, text: str, language: str = "English", **extra) -> dict:  # noqa: ANN003
    """Return one row in WildChat-1M's schema (the fields the source reads, and some it does not)."""
    return {
        "conversation_hash": f"h{k:04d}",
        "model": "gpt-3.5-turbo-0301",
        "turn": 1,
        "language": language,
        "toxic": False,
        "conversation": [
            {"role": "user", "content": text, "language": language, "turn_identifier": 100 + k},
            {"role": "assistant", "content": "Sure, here it is.", "turn_identifier": 100 + k},
        ],
        **extra,
    }


def test_wildchat_preset_is_pinned_and_reads_first_user_turns_from_the_hub(monkeypatch) -> None:
    from llmlab.preferences.config import WILDCHAT_REVISION

    assert re.fullmatch(r"[0-9a-f]{40}", WILDCHAT_REVISION)
    calls = {}
    rows = [
        wildchat_row(0, "Write a haiku about autumn leaves falling."),
        wildchat_row(1, "Écris un haïku sur les feuilles d'automne.", language="French"),
        wildchat_row(2, "Explain what a hash map is to a beginner."),
    ]

    class Stream:
        def shuffle(self, seed, buffer_size):  # noqa: ANN001, ANN201
            return iter(rows)

    def load_dataset(name, config, split, revision, streaming):  # noqa: ANN001, ANN202
        calls["load"] = (name, config, split, revision, streaming)
        return Stream()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = TaskSource(origin="wildchat", count=5, preset="wildchat")
    got = source_tasks(src, 0, [])
    assert calls["load"] == ("allenai/WildChat-1M", None, "train", WILDCHAT_REVISION, True)
    assert got == [
        ("wildchat-h0000", "Write a haiku about autumn leaves falling."),
        ("wildchat-h0002", "Explain what a hash map is to a beginner."),
    ]


def test_wildchat_from_a_local_file_in_its_schema(tmp_path) -> None:
    rows = [
        wildchat_row(0, "Write a haiku about autumn leaves falling."),
        wildchat_row(1, "Bonjour, peux-tu m'aider avec mes devoirs ?", language="French"),
        # A chat whose first turn is the assistant's: the task is the first *user* turn.
        {
            **wildchat_row(2, "unused"),
            "conversation": [
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Plan a three-day trip  to Kyoto\nfor a family."},
            ],
        },
        {**wildchat_row(3, "unused"), "conversation": []},  # no user turn: skipped
        wildchat_row(4, "hi"),  # under 3 words: skipped
        wildchat_row(5, "List five uses for a paperclip in an office."),
    ]
    local = tmp_path / "wildchat.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = TaskSource(origin="wildchat", count=3, preset="wildchat", path=str(local))
    assert src.dataset is None and src.revision is None and src.conversation
    assert source_tasks(src, 0, []) == [
        ("wildchat-h0000", "Write a haiku about autumn leaves falling."),
        ("wildchat-h0002", "Plan a three-day trip to Kyoto for a family."),
        ("wildchat-h0005", "List five uses for a paperclip in an office."),
    ]
    flat = tmp_path / "flat.jsonl"
    flat.write_text(json.dumps({**rows[0], "conversation": "just a string"}) + "\n")
    bad = TaskSource(origin="wildchat", count=1, preset="wildchat", path=str(flat))
    with pytest.raises(
        DataError, match=r"sources\.wildchat: row 0 field 'conversation' is not a list"
    ):
        source_tasks(bad, 0, [])


def test_a_revision_is_a_commit_of_a_hub_dataset() -> None:
    with pytest.raises(ValidationError, match="revision must be a commit .* got 'main'"):
        TaskSource(origin="w", count=1, preset="wildchat", revision="main")
    with pytest.raises(ValidationError, match="revision applies to a hub dataset only"):
        TaskSource(origin="x", count=1, path="x.jsonl", revision="0" * 40)


def test_paper_preset_lists_the_seeds_public_origins_as_sources() -> None:
    import yaml

    from llmlab.preferences.config import TasksSection

    root = Path(__file__).resolve().parents[1]
    preset = yaml.safe_load((root / "configs/preferences_paper.yaml").read_text())
    tasks = TasksSection(**preset["preferences"]["tasks"])
    by_origin = {s.origin: s for s in tasks.sources}
    assert {"wildchat", "alpaca", "math"} <= set(by_origin)
    assert by_origin["wildchat"].dataset == "allenai/WildChat-1M"
    assert by_origin["wildchat"].revision is not None and by_origin["wildchat"].conversation
    assert tasks.hub_required and tasks.topic_classifier == "judge"
