"""Tests for the preferences task pool, topic map, OOD prompts and split helpers."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from llmlab.preferences import taskgen
from llmlab.preferences.tasks import (
    Task,
    check_topics,
    load_ood_prompts,
    load_tasks,
    load_topic_names,
    load_topics,
    split_tasks,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "preferences"
TASKS = DATA / "tasks.jsonl"
TOPICS = DATA / "topics.json"
OOD = DATA / "ood_prompts.jsonl"


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return load_tasks(TASKS)


def test_counts(tasks: list[Task]) -> None:
    assert len(tasks) >= 900
    per_topic = Counter(t.topic for t in tasks)
    assert len(per_topic) == 12
    assert min(per_topic.values()) >= 60, per_topic


def test_ids_and_prompts_unique(tasks: list[Task]) -> None:
    ids = [t.id for t in tasks]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"t\d{5}", i) for i in ids)
    prompts = [t.prompt.casefold().strip() for t in tasks]
    assert len(set(prompts)) == len(prompts)


def test_prompt_lengths_and_origins(tasks: list[Task]) -> None:
    for t in tasks:
        assert 5 <= len(t.prompt.split()) <= 60, t.id
        assert t.origin in ("handwritten", "templated")


def test_topics_json_consistent(tasks: list[Task]) -> None:
    names = load_topic_names(TOPICS)
    mapping = load_topics(TOPICS)
    assert len(names) == 12 == len(set(names))
    assert {t.topic for t in tasks} == set(names)
    assert set(mapping) == {t.id for t in tasks}
    check_topics(tasks, mapping)
    check_topics(tasks, names)


def test_check_topics_names_first_missing_task() -> None:
    ts = [
        Task("t1", "math", "handwritten", "p one two three four"),
        Task("t2", "coding", "handwritten", "p one two three five"),
        Task("t3", "coding", "handwritten", "p one two three six"),
    ]
    with pytest.raises(ValueError, match="t2"):
        check_topics(ts, {"t1": "math", "t3": "coding"})
    with pytest.raises(ValueError, match="t2"):
        check_topics(ts, {"t1": "math", "t2": "math", "t3": "coding"})
    with pytest.raises(ValueError, match="t2"):
        check_topics(ts, ["math"])


def test_taskgen_reproduces_shipped_files(tmp_path: Path) -> None:
    out, topics, ood = tmp_path / "tasks.jsonl", tmp_path / "topics.json", tmp_path / "ood.jsonl"
    inputs = TASKS.with_name("taskgen")
    args = ["--out", str(out), "--topics-out", str(topics), "--ood-out", str(ood)]
    taskgen.main([*args, "--inputs", str(inputs)])
    assert out.read_bytes() == TASKS.read_bytes()
    assert topics.read_bytes() == TOPICS.read_bytes()
    assert ood.read_bytes() == OOD.read_bytes()


def test_split_disjoint_and_stratified(tasks: list[Task]) -> None:
    train, evals = split_tasks(tasks, n_train=600, n_eval=200, seed=0)
    assert len(train) == 600 and len(evals) == 200
    assert not {t.id for t in train} & {t.id for t in evals}
    pool = Counter(t.topic for t in tasks)
    for part, n in ((train, 600), (evals, 200)):
        got = Counter(t.topic for t in part)
        for topic, size in pool.items():
            assert abs(got[topic] - n * size / len(tasks)) <= 1, (topic, got[topic])


def test_split_deterministic_and_seeded(tasks: list[Task]) -> None:
    a = split_tasks(tasks, 300, 100, seed=7)
    b = split_tasks(tasks, 300, 100, seed=7)
    c = split_tasks(tasks, 300, 100, seed=8)
    assert a == b
    assert a != c


def test_split_exclusion_enforced(tasks: list[Task]) -> None:
    excluded = {t.id for t in tasks if t.topic == "math"}
    train, evals = split_tasks(tasks, 500, 200, seed=1, exclude_ids=excluded)
    assert not ({t.id for t in train} | {t.id for t in evals}) & excluded
    assert "math" not in {t.topic for t in train + evals}


def test_split_whole_pool(tasks: list[Task]) -> None:
    train, evals = split_tasks(tasks, len(tasks) - 100, 100, seed=3)
    assert {t.id for t in train} | {t.id for t in evals} == {t.id for t in tasks}


def test_split_errors(tasks: list[Task]) -> None:
    with pytest.raises(ValueError, match="only"):
        split_tasks(tasks, len(tasks), 1, seed=0)
    with pytest.raises(ValueError, match="only"):
        split_tasks(tasks, 10, 10, seed=0, exclude_ids=[t.id for t in tasks[5:]])
    dup = tasks[:20] + [tasks[3]]
    with pytest.raises(ValueError, match=tasks[3].id):
        split_tasks(dup, 10, 5, seed=0)


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


GOOD = {"id": "t00001", "topic": "math", "origin": "templated", "prompt": "Add two and two."}


def test_load_tasks_bad_line_names_file_and_line(tmp_path: Path) -> None:
    p = _write(tmp_path / "bad.jsonl", [GOOD, "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_tasks(p)


def test_load_tasks_missing_field_names_line(tmp_path: Path) -> None:
    row = {k: v for k, v in GOOD.items() if k != "prompt"} | {"id": "t00002"}
    p = _write(tmp_path / "missing.jsonl", [GOOD, row])
    with pytest.raises(ValueError, match=r"missing\.jsonl:2.*prompt"):
        load_tasks(p)


def test_load_tasks_bad_origin(tmp_path: Path) -> None:
    p = _write(tmp_path / "origin.jsonl", [GOOD | {"origin": "scraped"}])
    with pytest.raises(ValueError, match=r"origin\.jsonl:1"):
        load_tasks(p)


def test_load_tasks_duplicate_id(tmp_path: Path) -> None:
    p = _write(tmp_path / "dup.jsonl", [GOOD, GOOD | {"prompt": "Add three and three."}])
    with pytest.raises(ValueError, match="t00001"):
        load_tasks(p)


def test_ood_prompts_reference_existing_tasks(tasks: list[Task]) -> None:
    prompts = load_ood_prompts(OOD)
    by_id = {t.id: t for t in tasks}
    names = set(load_topic_names(TOPICS))
    kinds = Counter(p.kind for p in prompts)
    assert kinds["category"] >= 12 and kinds["novel_topic"] >= 12
    assert kinds["competing"] >= 8 and kinds["persona"] >= 6
    for p in prompts:
        for tid in p.target_task_ids:
            assert tid in by_id, (p.id, tid)
        if p.kind in ("category", "competing"):
            assert p.target_topic in names
        if p.kind == "category":
            assert p.target_task_ids == ()
        if p.kind == "persona":
            assert p.direction == 0 and set(p.persona_expect) <= names
            assert set(p.persona_expect.values()) <= {-1, 1}


def test_novel_topic_targets(tasks: list[Task]) -> None:
    by_id = {t.id: t for t in tasks}
    novel = [p for p in load_ood_prompts(OOD) if p.kind == "novel_topic"]
    subjects = Counter((p.novel_subject, p.direction) for p in novel)
    assert {s for s, _ in subjects} == {
        "cheese",
        "cats",
        "the ocean",
        "trains",
        "gardening",
        "space",
    }
    assert all(subjects[(s, d)] == 1 for s, _ in subjects for d in (1, -1))
    for p in novel:
        assert len(p.target_task_ids) >= 6
        pattern = taskgen.load_inputs(TASKS.with_name("taskgen")).novel_patterns[p.novel_subject]
        for tid in p.target_task_ids:
            assert by_id[tid].origin == "handwritten"
            assert re.search(pattern, by_id[tid].prompt, re.IGNORECASE), tid
        # No task outside the target set mentions the subject.
        others = [t for t in tasks if t.id not in p.target_task_ids]
        assert not [t.id for t in others if re.search(pattern, t.prompt, re.IGNORECASE)]


def test_competing_pairs_flip() -> None:
    comp = [p for p in load_ood_prompts(OOD) if p.kind == "competing"]
    pairs: dict[str, list] = {}
    for p in comp:
        pairs.setdefault(p.pair_id, []).append(p)
    assert len(pairs) >= 4
    for members in pairs.values():
        assert len(members) == 2
        a, b = members
        assert (a.target_topic, a.opposing_topic) == (b.opposing_topic, b.target_topic)


def test_load_ood_rejects_bad_kind(tmp_path: Path) -> None:
    row = {
        "id": "x",
        "kind": "vibes",
        "system_prompt": "You like things.",
        "direction": 1,
        "target_topic": None,
        "target_task_ids": [],
    }
    p = _write(tmp_path / "ood.jsonl", [row])
    with pytest.raises(ValueError, match=r"ood\.jsonl:1"):
        load_ood_prompts(p)


def test_taskgen_inputs_are_data_files_and_errors_name_them(tmp_path: Path) -> None:
    import shutil

    from llmlab.io import DataError

    src = TASKS.with_name("taskgen")
    inputs = taskgen.load_inputs(src)
    assert inputs.topics[0] == "math" and "cheese" in inputs.novel_patterns
    shutil.copytree(src, tmp_path / "in")
    ood = tmp_path / "in" / "ood.yaml"
    ood.write_text(ood.read_text().replace("topic_phrases:", "phrases:"))
    with pytest.raises(DataError, match=r"ood\.yaml: field 'topic_phrases' is missing"):
        taskgen.load_inputs(tmp_path / "in")
    # an edit to the inputs changes the generated pool
    shutil.copytree(src, tmp_path / "edited")
    hw = tmp_path / "edited" / "handwritten.yaml"
    hw.write_text(
        hw.read_text().replace(
            "List the first 200 prime numbers.", "List the first 300 prime numbers.", 1
        )
    )
    rows = taskgen.build_tasks(taskgen.load_inputs(tmp_path / "edited"))
    assert rows[0]["prompt"] == "List the first 300 prime numbers."


def test_generator_is_the_stage_writing_the_shipped_inputs() -> None:
    import yaml

    stage = yaml.safe_load((DATA.parents[1] / "dvc.yaml").read_text())["stages"][
        "preferences_taskgen"
    ]
    assert "data/preferences/taskgen" in stage["deps"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
    assert outs == [
        "data/preferences/tasks.jsonl",
        "data/preferences/topics.json",
        "data/preferences/ood_prompts.jsonl",
    ]
    assert all(
        f"--{flag} {out}" in stage["cmd"]
        for flag, out in zip(("out", "topics-out", "ood-out"), outs, strict=True)
    )
