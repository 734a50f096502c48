"""Task sources: local JSONL / CSV and Hugging Face datasets mixed into the pool."""

from __future__ import annotations

import json
import sys
import types

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

    def load_dataset(name, config, split, streaming):  # noqa: ANN001, ANN202
        calls["load"] = (name, config, split, streaming)
        return Stream([{"problem": f"Solve problem number {k} of the set."} for k in range(9)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = TaskSource(origin="math", count=3, preset="math")
    got = source_tasks(src, 7, [])
    assert calls["load"] == ("EleutherAI/hendrycks_math", "algebra", "train", True)
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
