"""The concept list: the plan's 102 concept vectors, the first 42 being the earlier list."""

from __future__ import annotations

from pathlib import Path

from llmlab.introspection.data import balanced_concepts
from llmlab.io import read_json

CONCEPTS = Path(__file__).resolve().parents[1] / "data" / "introspection" / "concepts.json"


def test_the_list_holds_102_distinct_concepts_apart_from_the_baseline_words():
    doc = read_json(CONCEPTS)
    words = [c["word"] for c in doc["concepts"]]
    assert len(words) == 102 == len(set(words))
    assert not set(words) & set(doc["baseline_words"])
    assert {c["kind"] for c in doc["concepts"]} == {"emotion", "topic", "persona", "abstract"}
    # vectors.n_concepts takes a prefix: 42 gives the list the earlier runs used.
    assert words[:3] == ["joy", "fear", "anger"] and words[41] == "sailor"
    # "food" would be the food-control task's own subject, not an out-of-distribution concept.
    assert "food" not in words


def test_b6_takes_the_kinds_in_turn():
    chosen = balanced_concepts(read_json(CONCEPTS)["concepts"], 20)
    kinds = [c["kind"] for c in chosen]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "emotion": 5, "topic": 5, "persona": 5, "abstract": 5
    }  # fmt: skip
