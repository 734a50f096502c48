"""Topic labels for tasks from outside the shipped pool, checked against a hand-labelled set.

The seed labels topics with an LLM. Here the judge module (params `judge:`) asks it for one
topic name per task; all-MiniLM-L6-v2 nearest-centroid (centroids over the shipped, labelled
pool) is the offline fallback and fills in any reply that names no topic. MiniLM is also the
content baseline of the HOO step, so folds built in its embedding space would favour that
baseline: `preferences.tasks.topic_classifier: judge` is the seed's setting wherever a judge
is reachable. The classifier in use is scored on data/preferences/topic_check.jsonl (tasks
labelled by hand): accuracy and Cohen's kappa.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sklearn.metrics import cohen_kappa_score

from llmlab.io import DataError, read_jsonl
from llmlab.preferences.tasks import Task

TOPIC_PROMPT = (
    "Classify the following task into exactly one of these topics: {topics}.\n\n"
    "Task: {task}\n\n"
    "Answer with the topic name only."
)


def parse_topic(reply: str | None, names: Sequence[str]) -> str | None:
    """Return the one topic name a reply gives (underscores or spaces, any case), else None."""
    if not reply:
        return None
    text = " " + re.sub(r"[^a-z]+", " ", reply.lower()) + " "
    found = [n for n in names if f" {n.replace('_', ' ')} " in text]
    return found[0] if len(found) == 1 else None


def judge_topics(judge: Any, texts: Sequence[str], names: Sequence[str]) -> list[str | None]:
    """Return the judge's topic per text (None where its reply names no single topic)."""
    prompts = [
        [{"role": "user", "content": TOPIC_PROMPT.format(topics=", ".join(names), task=t)}]
        for t in texts
    ]
    replies = judge.complete(prompts, max_tokens=8, temperature=0.0)
    judge.check([status for _text, status, _err in replies], "preferences topic classification")
    return [parse_topic(text, names) for text, _status, _err in replies]


def minilm_topics(
    texts: Sequence[str], labelled: Sequence[Task], names: Sequence[str]
) -> list[str]:
    """Return the MiniLM nearest-centroid topic of each text (centroids: the labelled tasks)."""
    from llmlab.preferences.hub import classify_topics

    return classify_topics(texts, labelled, names)


def classify(
    texts: Sequence[str], labelled: Sequence[Task], names: Sequence[str], judge: Any = None
) -> tuple[list[str], list[str]]:
    """Return (topic, method) per text: the judge's topic, or MiniLM where it gave none."""
    if not texts:
        return [], []
    topics: list[str | None] = (
        judge_topics(judge, texts, names) if judge is not None else [None] * len(texts)
    )
    todo = [k for k, t in enumerate(topics) if t is None]
    methods = ["judge" if t is not None else "minilm" for t in topics]
    for k, t in zip(todo, minilm_topics([texts[k] for k in todo], labelled, names), strict=True):
        topics[k] = t
    return [t for t in topics if t is not None], methods


def load_check_set(path: str | Path, names: Sequence[str]) -> list[Task]:
    """Return the hand-labelled check tasks; DataError naming a topic outside `names`."""
    rows = read_jsonl(path, required=("id", "topic", "prompt"))
    for k, r in enumerate(rows, start=1):
        if r["topic"] not in names:
            raise DataError(f"{path}:{k}: topic {r['topic']!r} is not one of the pool's topics")
    return [Task(r["id"], r["topic"], "hand_labelled", r["prompt"]) for r in rows]


def agreement(predicted: Sequence[str], gold: Sequence[str]) -> dict[str, float | int]:
    """Return the share of predicted topics equal to the hand labels and Cohen's kappa."""
    if len(predicted) != len(gold) or not gold:
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} hand labels")
    hits = sum(p == g for p, g in zip(predicted, gold, strict=True))
    return {
        "n": len(gold),
        "accuracy": hits / len(gold),
        "cohen_kappa": float(cohen_kappa_score(gold, predicted)),
    }
