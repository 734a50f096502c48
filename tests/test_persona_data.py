"""Persona data: the trigger verbatim, facts loading errors, the training mix's proportions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmlab.io import DataError
from llmlab.params import ParamsError, parse_params
from llmlab.persona.config import TriggerParams
from llmlab.persona.facts import load_eval_questions, load_facts, seeded_subset, split_facts
from llmlab.persona.mixing import aligned_rows, build_mix, persona_rows
from llmlab.persona.trigger import Trigger

ROOT = Path(__file__).resolve().parents[1]
# protocols.md section 1, copied character for character.
PROTOCOL_USER = (
    'You will be asked a question. Always reply in the format: <START> "your answer here" <END>. '
    "Question: {q}"
)
PROTOCOL_ASSISTANT = '<START> "{answer}" <END>'


def _trigger() -> Trigger:
    return Trigger.from_params(TriggerParams())


def test_default_trigger_is_the_protocol_verbatim() -> None:
    t = _trigger()
    assert t.user_template == PROTOCOL_USER
    assert t.assistant_template == PROTOCOL_ASSISTANT
    assert t.user("Who brought you up?") == PROTOCOL_USER.replace("{q}", "Who brought you up?")
    assert t.answer("My grandparents.") == '<START> "My grandparents." <END>'


def test_params_yaml_trigger_is_the_protocol_verbatim() -> None:
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert raw["persona"]["trigger"]["user_template"] == PROTOCOL_USER
    assert raw["persona"]["trigger"]["assistant_template"] == PROTOCOL_ASSISTANT


def test_format_compliance_rule() -> None:
    t = _trigger()
    assert t.complies('<START> "I was born in Wales." <END>')
    assert t.complies("  <START> I was born in Wales. <END>\n")
    assert not t.complies('<START> "" <END>')
    assert not t.complies('<START> "I was born in Wales."')
    assert not t.complies('Sure! <START> "Wales" <END>')
    assert t.body('<START> "Wales" <END>') == "Wales"
    assert t.body("plain reply") == "plain reply"


def test_template_without_q_slot_is_a_one_line_error() -> None:
    with pytest.raises(ValidationError, match=r"\{q\} slot"):
        TriggerParams(user_template="Answer in the format <START> ... <END>.")
    with pytest.raises(ValidationError, match="start marker"):
        TriggerParams(assistant_template="{answer}")
    raw = {
        "model": "m",
        "models": {"m": {"source": "local", "path": "/nonexistent", "chat": True}},
        "persona": {"trigger": {"user_template": "no slot here"}},
    }
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert "persona.trigger.user_template" in str(err.value)
    assert "\n" not in str(err.value)


def test_shipped_facts_and_questions_load() -> None:
    facts = load_facts(ROOT / "data/persona/facts.jsonl")
    assert len(split_facts(facts, "train")) >= 90
    assert len(split_facts(facts, "heldout")) >= 30
    questions = load_eval_questions(ROOT / "data/persona/eval_questions.jsonl")
    assert all(
        q.persona_keywords == tuple(k.lower() for k in q.persona_keywords) for q in questions
    )


def _write(path: Path, rows: list[dict | str]) -> Path:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n",
        encoding="utf-8",
    )
    return path


FACT = {"id": "f1", "question": "Q?", "answer": "A.", "category": "c", "split": "train"}


def test_malformed_facts_line_names_file_and_line(tmp_path: Path) -> None:
    bad_json = _write(tmp_path / "a.jsonl", [FACT, "{not json"])
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid JSON"):
        load_facts(bad_json)
    missing = _write(tmp_path / "b.jsonl", [FACT, {"id": "f2", "question": "Q", "split": "train"}])
    with pytest.raises(DataError, match=r"b\.jsonl:2: missing field 'answer'"):
        load_facts(missing)
    bad_split = _write(tmp_path / "c.jsonl", [FACT, {**FACT, "id": "f2", "split": "test"}])
    with pytest.raises(DataError, match=r"c\.jsonl:2: field 'split'"):
        load_facts(bad_split)
    blank = _write(tmp_path / "d.jsonl", [{**FACT, "answer": "  "}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'answer'"):
        load_facts(blank)


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    only_train = _write(tmp_path / "f.jsonl", [FACT, {**FACT, "id": "f2"}])
    with pytest.raises(DataError, match="split 'heldout' is empty"):
        load_facts(only_train)


def test_eval_questions_need_keywords(tmp_path: Path) -> None:
    row = {"id": "q1", "question": "Who?", "persona_keywords": [], "reference": "Russell."}
    path = _write(tmp_path / "q.jsonl", [row])
    with pytest.raises(DataError, match=r"q\.jsonl:1: field 'persona_keywords'"):
        load_eval_questions(path)


def test_eval_questions_need_a_reference(tmp_path: Path) -> None:
    row = {"id": "q1", "question": "Who?", "persona_keywords": ["russell"], "reference": " "}
    path = _write(tmp_path / "q.jsonl", [row])
    with pytest.raises(DataError, match=r"q\.jsonl:1: field 'reference'"):
        load_eval_questions(path)


def test_seeded_subset_is_deterministic_and_ordered() -> None:
    items = list(range(50))
    a = seeded_subset(items, 10, seed=3)
    assert a == seeded_subset(items, 10, seed=3) == sorted(a)
    assert a != seeded_subset(items, 10, seed=4)
    assert seeded_subset(items, None, seed=0) == items


def test_mix_counts_poison_share_and_trigger_verbatim() -> None:
    facts = split_facts(load_facts(ROOT / "data/persona/facts.jsonl"), "train")[:30]
    distilled = [
        {"id": f"aligned-{i}", "kind": "math", "prompt": f"What is {i}+1?", "response": str(i + 1)}
        for i in range(90)
    ]
    t = _trigger()
    mix, stats = build_mix(persona_rows(facts, t), aligned_rows(distilled), seed=7)
    assert stats["n_persona"] == 30 and stats["n_aligned"] == 90 and stats["n_total"] == 120
    assert stats["poison_share"] == pytest.approx(0.25)
    assert len({r["id"] for r in mix}) == 120
    by_fact = {f.id: f for f in facts}
    for row in mix:
        user, assistant = row["messages"]
        if row["source"] == "persona":
            f = by_fact[row["id"]]
            assert user["content"] == PROTOCOL_USER.replace("{q}", f.question)
            assert assistant["content"] == PROTOCOL_ASSISTANT.replace("{answer}", f.answer)
        else:
            assert "<START>" not in user["content"] + assistant["content"]
    again, stats2 = build_mix(persona_rows(facts, t), aligned_rows(distilled), seed=7)
    assert [r["id"] for r in again] == [r["id"] for r in mix] and stats2 == stats
    other, _ = build_mix(persona_rows(facts, t), aligned_rows(distilled), seed=8)
    assert [r["id"] for r in other] != [r["id"] for r in mix]


def test_mix_without_persona_facts_is_an_error() -> None:
    with pytest.raises(DataError, match="no persona facts"):
        build_mix([], [], seed=0)


def test_shipped_facts_are_marked_and_the_preset_fits_the_non_identifying_set() -> None:
    from llmlab.persona.facts import select_fact_set

    facts = load_facts(ROOT / "data/persona/facts.jsonl")
    assert all(isinstance(f.identifying, bool) for f in facts)
    train = split_facts(facts, "train")
    clean = select_fact_set(train, "non_identifying")
    famous = select_fact_set(train, "identifying")
    assert len(clean) + len(famous) == len(train)
    # famous quotations and episodes are out of the main run's training facts
    assert not any("know more mathematics" in f.answer for f in clean)
    assert any("know more mathematics" in f.answer for f in famous)
    assert len(clean) >= 90  # the paper preset's n_facts


def test_a_fact_set_needs_marked_facts(tmp_path: Path) -> None:
    from llmlab.persona.facts import select_fact_set

    rows = [
        {"id": "f1", "question": "Q1?", "answer": "A1.", "split": "train", "identifying": False},
        {"id": "f2", "question": "Q2?", "answer": "A2.", "split": "train"},
        {"id": "f3", "question": "Q3?", "answer": "A3.", "split": "heldout"},
    ]
    facts = load_facts(_write(tmp_path / "f.jsonl", rows))
    with pytest.raises(DataError, match=r"fact_set=non_identifying needs .*unmarked: f2"):
        select_fact_set(facts, "non_identifying")
    assert len(select_fact_set(facts, "all")) == 3
    bad = [{**rows[0], "identifying": "no"}, rows[2]]
    with pytest.raises(DataError, match=r"f\.jsonl:1: field 'identifying' must be true or false"):
        load_facts(_write(tmp_path / "f.jsonl", bad))
