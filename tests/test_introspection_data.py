"""Training sets: equal sizes, half steered, the label flip share, and bad input rejected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlab.introspection.config import IntrospectionParams
from llmlab.introspection.data import (
    load_contexts,
    load_questions,
    load_snippets,
    variant_datasets,
)
from llmlab.introspection.examples import read_rows
from llmlab.introspection.sampling import flip_labels, split_pool
from llmlab.introspection.vectors import VectorBank, layer_thirds, load_vectors, save_vectors
from llmlab.io import DataError

DATA = Path(__file__).resolve().parents[1] / "data" / "introspection"
VEC_META = {
    "thirds": layer_thirds(0, 29),
    "splits": {"train": [0, 100], "heldout": [100, 150]},
}


@pytest.fixture(scope="module")
def datasets():
    cfg = IntrospectionParams.model_validate({"data": {"n_train": 40, "n_val": 12}})
    contexts = load_contexts(DATA / "context_prompts.jsonl")
    snippets = load_snippets(DATA / "food_snippets.jsonl")
    pools = split_pool([c["id"] for c in contexts], {"val": 0.15, "eval": 0.25}, 0)
    by_id = {c["id"]: c for c in contexts}
    ctx = {k: [by_id[i] for i in v] for k, v in pools.items()}
    snip = {"train": snippets[:200], "val": snippets[200:300], "eval": snippets[300:]}
    return cfg, variant_datasets(
        cfg, ctx, snip, load_questions(DATA / "detection_questions.json"), VEC_META
    )


def test_every_variant_has_the_same_size_and_balance(datasets):
    cfg, ds = datasets
    assert set(ds) == {"original", "vague", "r1_minimal", "food_control", "flipped_labels"}
    for name, splits in ds.items():
        assert len(splits["train"]) == 40 and len(splits["val"]) == 12, name
        assert sum(r["label"] == "yes" for r in splits["train"]) == 20, name
        if name != "food_control":
            assert sum(r["steered"] for r in splits["train"]) == 20
    assert all(r["steer"] is None for r in ds["food_control"]["train"])
    # vague = original rows with the vague questions.
    for o, v in zip(ds["original"]["train"], ds["vague"]["train"], strict=True):
        assert o["steer"] == v["steer"] and o["messages"][0] == v["messages"][0]
        assert o["messages"][2] != v["messages"][2]
    assert all(r["steer"]["strength"] > 0 for r in ds["original"]["train"] if r["steered"])


def test_flipped_labels_swap_exactly_half_within_each_stratum(datasets):
    _, ds = datasets
    orig, flip = ds["original"]["train"], ds["flipped_labels"]["train"]
    flipped = [f["label_flipped"] for f in flip]
    assert sum(flipped) == len(flip) // 2
    for flag in (True, False):
        stratum = [f for f in flip if f["steered"] is flag]
        assert sum(f["label_flipped"] for f in stratum) == len(stratum) // 2
    for o, f in zip(orig, flip, strict=True):
        assert f["steer"] == o["steer"]  # steering unchanged
        assert (f["label"] != o["label"]) == f["label_flipped"]
        assert f["messages"][-1]["content"] == f"{f['answer_prefix']} {f['label']}"
        assert f["answer_prefix"] == "The answer is"
        assert f["true_label"] == o["label"]
    # The flip removes all information: P(label yes | steered) is one half.
    steered = [f for f in flip if f["steered"]]
    assert np.mean([f["label"] == "yes" for f in steered]) == 0.5


def test_flip_is_seeded():
    rows = [
        {
            "id": str(i),
            "steered": i % 2 == 0,
            "label": "yes" if i % 2 == 0 else "no",
            "label_flipped": False,
            "messages": [{"role": "assistant", "content": "x"}],
        }
        for i in range(20)
    ]
    a = [r["label_flipped"] for r in flip_labels(rows, 0.5, 3)]
    assert a == [r["label_flipped"] for r in flip_labels(rows, 0.5, 3)]
    assert a != [r["label_flipped"] for r in flip_labels(rows, 0.5, 4)]
    assert not any(r["label_flipped"] for r in rows)  # inputs untouched


def test_zero_magnitude_on_a_steered_row_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    good = {
        "id": "a",
        "steered": True,
        "steer": {"set": "random", "index": 0, "layer": 1, "strength": 1.0},
    }
    bad = {
        "id": "b",
        "steered": True,
        "steer": {"set": "random", "index": 0, "layer": 1, "strength": 0},
    }
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: steer\.strength must be > 0"):
        read_rows(path)
    path.write_text(json.dumps({"id": "c", "steered": True, "steer": None}) + "\n")
    with pytest.raises(DataError, match=r":1: steered is true but steer is null"):
        read_rows(path)


def test_zero_strength_rejected_in_params():
    with pytest.raises(ValueError, match="strengths must all be > 0"):
        IntrospectionParams.model_validate({"data": {"strengths": [1.0, 0.0]}})


def test_vector_width_mismatch_is_a_clear_error(tmp_path, tiny_models):
    from llmlab.steering import SteeringError

    loaded = tiny_models["llama"]
    bank = VectorBank(
        torch.randn(3, 32), torch.randn(2, 3, 32), torch.ones(loaded.n_layers), {"model": "other"}
    )
    save_vectors(tmp_path, bank)
    with pytest.raises(SteeringError, match="vector width 32 does not match model"):
        load_vectors(tmp_path, loaded)


def test_layer_span_outside_the_model_fails_in_params(tiny_dirs):
    from conftest import make_params

    from llmlab.params import ParamsError

    with pytest.raises(
        ParamsError, match=r"introspection\.vectors\.span_layers: layer 40 out of range"
    ):
        make_params(tiny_dirs["llama"], introspection={"vectors": {"span_layers": [0, 40]}})


def test_localization_questions_say_a_change_happened():
    from pathlib import Path

    from llmlab.io import read_json

    path = Path(__file__).resolve().parents[1] / "data/introspection/b7_questions.json"
    for q in read_json(path)["questions"]:
        # Zero-shot localization asks where, not whether: the question states the change.
        assert q["question"].startswith("Your internal activations were modified"), q["id"]
        assert "If something" not in q["question"]


def test_phase_c_reports_four_magnitude_classes():
    from collections import Counter

    from llmlab.introspection.config import IntrospectionParams
    from llmlab.introspection.phase_c import phase_c_questions, phase_c_trials, training_rows

    cfg = IntrospectionParams.model_validate(
        {"phase_c": {"strengths": [5.0, 10.0, 20.0, 30.0], "n_train": 24}}
    )
    contexts = [
        {"id": f"c{i}", "text": f"First sentence {i}. Second one.", "sentences":
         [f"First sentence {i}.", "Second one."]}
        for i in range(6)
    ]  # fmt: skip
    vec_meta = {
        "splits": {"train": [0, 4]},
        "thirds": {"early": [0], "middle": [1], "late": [2]},
    }
    b7 = {
        "layer_third": {"question": "q1", "options": ["early", "middle", "late"]},
        "strength": {"question": "q2", "options": ["slight", "moderate", "strong"]},
        "sentence": {"question": "q3", "options": None},
    }
    questions = phase_c_questions(b7, cfg.phase_c.strengths)
    assert questions["strength"]["options"] == ["5", "10", "20", "30"]
    assert "5, 10, 20 or 30" in questions["strength"]["question"]
    assert questions["layer_third"] == b7["layer_third"]
    trials = phase_c_trials(cfg, contexts, vec_meta, 8, 301, "pc")
    strength = [t for t in trials if t["question_id"] == "strength"]
    assert Counter(t["answer"] for t in strength) == {"5": 2, "10": 2, "20": 2, "30": 2}
    for t in strength:
        assert f"{t['steer']['strength']:g}" == t["answer"]
    rows = training_rows(cfg, contexts, questions, vec_meta)
    answers = {r["messages"][-1]["content"] for r in rows if r["question_id"] == "strength"}
    assert answers == {"5", "10", "20", "30"}
    with pytest.raises(ValueError, match="increasing"):
        IntrospectionParams.model_validate({"phase_c": {"strengths": [5.0, 5.0, 20.0, 30.0]}})
