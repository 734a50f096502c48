"""Topic labels: the judge's classification, the MiniLM fallback and the hand-labelled check."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmlab.io import DataError
from llmlab.preferences.tasks import load_tasks, load_topic_names
from llmlab.preferences.topics import agreement, classify, load_check_set, parse_topic

ROOT = Path(__file__).resolve().parents[1]
NAMES = load_topic_names(ROOT / "data/preferences/topics.json")
CHECK = ROOT / "data/preferences/topic_check.jsonl"


@pytest.mark.parametrize(
    ("reply", "want"),
    [
        ("creative_writing", "creative_writing"),
        ("Creative writing.", "creative_writing"),
        ("Topic: MATH", "math"),
        ("fiction or creative writing", None),  # two topics: no label
        ("cooking", None),
        (None, None),
    ],
)
def test_parse_topic(reply, want) -> None:
    assert parse_topic(reply, NAMES) == want


class FakeJudge:
    """Answers the topic question from a table; unknown tasks get an off-list reply."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.checked: list[str] = []

    def complete(self, prompts, max_tokens, temperature=None):  # noqa: ANN001, ANN201
        out = []
        for p in prompts:
            content = p[0]["content"]
            task = content.split("Task: ", 1)[1].split("\n\n", 1)[0]
            assert all(n in content for n in NAMES)
            out.append((self.answers.get(task, "I cannot tell"), "ok", ""))
        return out

    def check(self, statuses, what):  # noqa: ANN001, ANN201
        self.checked.append(what)


def test_judge_labels_and_minilm_fills_unparseable(monkeypatch) -> None:
    import llmlab.preferences.topics as topics

    monkeypatch.setattr(
        topics, "minilm_topics", lambda texts, labelled, names: ["trivia"] * len(texts)
    )
    judge = FakeJudge({"Solve 2x = 4.": "math", "Write a haiku.": "Creative writing"})
    got, methods = classify(["Solve 2x = 4.", "Who won?", "Write a haiku."], [], NAMES, judge)
    assert got == ["math", "trivia", "creative_writing"]
    assert methods == ["judge", "minilm", "judge"]
    assert judge.checked == ["preferences topic classification"]


def test_check_set_covers_every_topic_and_rejects_unknown(tmp_path) -> None:
    check = load_check_set(CHECK, NAMES)
    assert {t.topic for t in check} == set(NAMES) and len(check) == 3 * len(NAMES)
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"id": "x", "topic": "cooking", "prompt": "Bake bread."}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:1: topic 'cooking'"):
        load_check_set(bad, NAMES)


def test_agreement_counts_and_kappa() -> None:
    a = agreement(["math", "coding", "math", "trivia"], ["math", "coding", "trivia", "trivia"])
    assert a["n"] == 4 and a["accuracy"] == 0.75 and 0 < a["cohen_kappa"] < 1
    assert agreement(["math", "coding"], ["math", "coding"])["cohen_kappa"] == 1.0


def test_minilm_fallback_agrees_with_the_hand_labels() -> None:
    pool = load_tasks(ROOT / "data/preferences/tasks.jsonl")
    check = load_check_set(CHECK, NAMES)
    got, methods = classify([t.prompt for t in check], pool, NAMES)
    assert set(methods) == {"minilm"}
    res = agreement(got, [t.topic for t in check])
    # measured: 33 of 36 (kappa 0.91); the misses are coding/math and summary/analysis
    assert res["accuracy"] >= 0.85 and res["cohen_kappa"] >= 0.8, res
