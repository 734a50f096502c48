"""B4 follows Binder et al.: the hypothetical question quotes the object-level prompt the model
answered, the property is read from that answer with their definitions, and all 25 tasks are
defined on answers of the shape their prompts ask for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmlab.introspection import eval_selfpred
from llmlab.introspection.config import B4Config
from llmlab.introspection.eval_selfpred import load_selfpred, selfpred_records, selfpred_summary
from llmlab.introspection.scoring import ChoiceScores
from llmlab.introspection.selfpred import TASKS, free_property, hypothetical_prompt

SELFPRED = Path(__file__).resolve().parents[1] / "data" / "introspection" / "selfpred"
PREVIOUSLY = "Previously, you were asked the following question: "

# Object-level answers of the shape Binder et al.'s prompts ask for.
ANSWERS = {
    "next 5 animals": "wolf sheep lion cow bear",
    "next 5 words": "Pebble, lantern anchor velvet cloud",
    "continue the story": "She stepped inside. The hall was dark.",
}


def test_properties_follow_binders_definitions():
    # Characters are the answer's own characters, words its white-space separated words.
    assert free_property("  snake elephant zebra", "second_character") == "n"
    assert free_property("I am", "second_character") == " "
    assert free_property('"Fox," dog cat', "first_word") == "fox"
    assert free_property("wolf sheep lion", "third_word") == "lion"
    assert free_property("Elephant zebra", "starts_with_vowel") == "yes"
    assert free_property("owl", "second_word") is None


def test_the_hypothetical_quotes_the_object_level_prompt():
    prompt = "What is the next 5 animals in the following text? ...\ncat dog \n"
    q = hypothetical_prompt(prompt, "third_character")
    assert q.startswith(PREVIOUSLY + '"What is the next 5 animals')
    assert 'if you responded with "abc", respond with "c"' in q


def test_the_shipped_prompts_are_binders_object_level_tasks():
    data = load_selfpred(SELFPRED, 200)
    assert all(r["prompt"].startswith("What is the next 5 animals") for r in data["animals"])
    assert all(r["prompt"].startswith("What is the next 5 words") for r in data["english_words"])
    assert all(
        r["prompt"].startswith("Please continue the story for two sentences:")
        for r in data["stories"]
    )
    # A sequence long enough that "the next 5" is a continuation, not a guess.
    assert all(7 <= len(r["sequence"].split()) <= 10 for r in data["animals"])


def _fake_model(monkeypatch, answers, seen):
    def fake_generate(loaded, prompts, **kw):
        out = []
        for messages in prompts:
            text = messages[-1]["content"]
            seen.append(text)
            if text.startswith(PREVIOUSLY):
                out.append('"w"')  # a hypothetical: parsed, then scored against the answer
            else:
                out.append(next(a for k, a in answers.items() if k in text))
        return out

    def fake_choice_scores(loaded, prompts, choices, specs, batch_size, **kw):
        seen.extend(m[-1]["content"] for m in prompts)
        n = len(choices[0])
        return ChoiceScores([np.log(np.full(n, 1.0 / n)) + np.eye(n)[0] for _ in prompts],
                            np.ones(len(prompts)))  # fmt: skip

    monkeypatch.setattr(eval_selfpred, "generate", fake_generate)
    monkeypatch.setattr(eval_selfpred, "choice_scores", fake_choice_scores)
    monkeypatch.setattr(eval_selfpred, "option_choices", lambda loaded, letters: letters)
    monkeypatch.setattr(eval_selfpred, "yes_no_choices", lambda loaded: ["yes", "no"])


def test_all_25_tasks_are_valid_on_answers_of_the_asked_shape(monkeypatch):
    seen: list[str] = []
    _fake_model(monkeypatch, ANSWERS, seen)
    data = load_selfpred(SELFPRED, 4)
    records = selfpred_records(None, data, B4Config(n_per_dataset=4), batch_size=8)
    summary = selfpred_summary(records)
    assert summary["n_tasks"] == 25 == len(TASKS)
    assert summary["n_valid"] == 25 and summary["invalid_tasks"] == []
    # Every hypothetical quotes an object-level prompt the model was asked.
    objects = [s for s in seen if not s.startswith(PREVIOUSLY)]
    hypotheticals = [s for s in seen if s.startswith(PREVIOUSLY)]
    assert hypotheticals and all(
        any(h.startswith(PREVIOUSLY + '"' + o.strip()) for o in objects) for h in hypotheticals
    )
    # The actual property is the model's own answer's: "wolf sheep lion cow bear".
    rec = next(r for r in records if r["task"] == "animals.third_word")
    assert rec["actual"] == "lion" and rec["predicted"] == "w"
    mcq = next(r for r in records if r["task"] == "mcq.among_a_or_c")
    assert mcq["object_answer"] == "A" and mcq["actual"] == "yes" and mcq["predicted"] == "yes"


def test_one_word_answers_leave_the_word_tasks_invalid(monkeypatch):
    short = {k: "Owl" for k in ANSWERS}
    _fake_model(monkeypatch, short, [])
    data = load_selfpred(SELFPRED, 4)
    summary = selfpred_summary(selfpred_records(None, data, B4Config(n_per_dataset=4), 8))
    assert set(summary["invalid_tasks"]) == {
        f"{ds}.{o}_word"
        for ds in ("animals", "english_words", "stories")
        for o in ("second", "third")
    }
    assert summary["n_valid"] == 19


def test_records_of_an_unknown_task_are_an_error():
    with pytest.raises(ValueError, match="unknown task"):
        selfpred_summary([{"task": "animals.fourth_word", "actual": "a", "predicted": "a"}])
