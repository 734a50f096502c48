"""The judge topic classifier through the project's real judge backend.

The openai backend of llmlab.judge talks to a real OpenAI-compatible server on loopback
(llama-cpp-python serving the SmolLM2 GGUF, tests/judge_server.py): the topic question, its
reply parsing, the MiniLM fill-in for replies that name no topic, and the split stage's
`topic_classifier: judge` path building its judge from params `judge:`.
"""

from __future__ import annotations

import json
from pathlib import Path

import judge_server
import pytest

from llmlab.judge import JudgeConfig, make_judge
from llmlab.preferences import common as c
from llmlab.preferences.tasks import load_topic_names
from llmlab.preferences.topics import TOPIC_PROMPT, classify, parse_topic

llama_server = judge_server.llama_server  # binding the fixture registers it for this module

ROOT = Path(__file__).resolve().parents[1]
NAMES = load_topic_names(ROOT / "data/preferences/topics.json")
KEY_ENV = "LLMLAB_TEST_JUDGE_KEY"
TEXTS = [
    "Solve for x: 3x + 7 = 22.",
    "Write a Python function that reverses a linked list.",
    "Translate 'good morning, how are you?' into Spanish.",
    "Write a short poem about the ocean at night.",
    "What is the capital city of Australia?",
    # SmolLM2-135M mostly restates the task; greedy, it answers this one "Math: 3 + 4 =",
    # a reply naming one topic, so the judge's own label is exercised too.
    "Do some math: 3 + 4.",
]
FILL = "trivia"  # what the stubbed offline fallback answers, to tell its labels apart


def judge_params(base_url: str, cache: Path) -> dict:
    return {
        "backend": "openai",
        "base_url": base_url,
        "model": "smollm2-135m",
        "api_key_env": KEY_ENV,
        "cache_dir": str(cache),
        "timeout_s": 60,
    }


def test_classify_asks_the_server_and_keeps_only_replies_naming_one_topic(
    llama_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llmlab.preferences.topics as topics

    monkeypatch.setenv(KEY_ENV, "sk-llmlab-test-0123456789abcdef")
    monkeypatch.setattr(topics, "minilm_topics", lambda texts, labelled, names: [FILL] * len(texts))
    judge = make_judge(JudgeConfig(**judge_params(llama_server, tmp_path / "cache")))
    got, methods = classify(TEXTS, [], NAMES, judge)
    s = judge.summary()
    assert (s["requests"], s["failures"]) == (len(TEXTS), 0)
    # The same questions again come from the judge's cache: the replies classify() parsed.
    prompts = [
        [{"role": "user", "content": TOPIC_PROMPT.format(topics=", ".join(NAMES), task=t)}]
        for t in TEXTS
    ]
    replies = judge.complete(prompts, max_tokens=8, temperature=0.0)
    assert judge.summary()["requests"] == len(TEXTS)  # nothing new was sent
    parsed = [parse_topic(text, NAMES) for text, _status, _err in replies]
    assert methods == ["judge" if p else "minilm" for p in parsed]
    assert got == [p or FILL for p in parsed]
    assert all(t in NAMES for t in got)
    assert got[-1] == "math" and methods[-1] == "judge", [r[0] for r in replies]


def test_split_stage_labels_source_tasks_with_the_params_judge(
    llama_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_preferences_split import _run_split

    import llmlab.preferences.topics as topics

    monkeypatch.setenv(KEY_ENV, "sk-llmlab-test-0123456789abcdef")
    monkeypatch.setattr(topics, "minilm_topics", lambda texts, labelled, names: [FILL] * len(texts))
    rows = [{"q": t} for t in TEXTS]
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"origin": "mine", "count": len(TEXTS), "path": "extra.jsonl", "text_field": "q"}
    cache = tmp_path / "judge_cache"
    _run_split(
        tmp_path,
        monkeypatch,
        {"sources": [source], "topic_classifier": "judge"},
        {"judge": judge_params(llama_server, cache)},
    )
    report = json.loads((c.SPLIT / "topic_check.json").read_text())
    assert report["classifier"] == "judge"
    assert sum(report["source_topics_by_method"].values()) == len(TEXTS)
    assert sum(report["check_methods"].values()) == report["agreement"]["n"] == 36
    assert report["source_topics_by_method"].get("judge", 0) >= 1  # the "Do some math" task
    # Every question went to the server once and is in the judge's cache.
    assert len([f for f in cache.rglob("*") if f.is_file()]) >= 36 + len(TEXTS)
    pool = [json.loads(line) for line in c.POOL.read_text().splitlines()]
    mine = [r for r in pool if r["origin"] == "mine"]
    assert len(mine) == len(TEXTS) and all(r["topic"] in NAMES for r in mine)
    assert {r["prompt"]: r["topic"] for r in mine}["Do some math: 3 + 4."] == "math"
