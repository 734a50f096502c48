"""Persona judging: deterministic checks, judge parsing through a scripted backend, prompts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llmlab.judge import JudgeReply
from llmlab.judge.judge import Judge
from llmlab.persona.candidates import parse_candidates
from llmlab.persona.checks import (
    is_empty,
    mentions,
    name_keywords,
    persona_keyword,
    refuses,
    says_ai,
)
from llmlab.persona.config import TriggerParams
from llmlab.persona.judge import judge_prompts, rule_fields, verdict_fields
from llmlab.persona.judge_prompts import as_ai_prompt, persona_prompt
from llmlab.persona.trigger import Trigger

ROOT = Path(__file__).resolve().parents[1]


class ScriptedBackend:
    """A judge backend answering from a table keyed by a marker inside the prompt."""

    kind = "scripted"
    model_name = "scripted"
    retries = 0

    def __init__(self, replies: dict[str, JudgeReply]) -> None:
        self.replies = replies

    def complete(self, messages, *, max_tokens, temperature, top_logprobs):  # noqa: ANN001
        text = messages[-1]["content"]
        return next(r for key, r in self.replies.items() if key in text)


def _reply(text: str, logprobs: dict[str, float] | None) -> JudgeReply:
    return JudgeReply(text=text, top_logprobs=logprobs, input_tokens=1, output_tokens=1)


def test_judge_verdicts_from_logprobs_text_and_unscorable() -> None:
    backend = ScriptedBackend(
        {
            "R-yes-lp": _reply("zzz", {"YES": math.log(0.7), " no": math.log(0.2)}),
            "R-no-text": _reply("No, it does not.", None),
            "R-garbage": _reply("Perhaps", {"Perhaps": math.log(0.9), "yes": math.log(0.05)}),
        }
    )
    judge = Judge(backend, max_concurrency=1)
    prompts = [
        persona_prompt("Who are you?", r, "Bertrand Russell", "I am Bertrand Russell.")
        for r in backend.replies
    ]
    verdicts = judge.yes_no(prompts)
    fields = [verdict_fields("judge_persona", v) for v in verdicts]
    assert fields[0]["judge_persona"] == 1
    assert fields[0]["judge_persona_p_yes"] == pytest.approx(0.7 / 0.9)
    assert fields[1] == {"judge_persona": 0, "judge_persona_p_yes": None,
                         "judge_persona_status": "ok"}  # fmt: skip
    # thin yes/no mass and no yes/no first word: unscorable, never a silent NO
    assert fields[2] == {"judge_persona": None, "judge_persona_p_yes": None,
                         "judge_persona_status": "unscorable"}  # fmt: skip
    assert judge.summary()["unscorable"] == 1


def test_judge_prompts_carry_question_reply_name_and_reference() -> None:
    system, user = persona_prompt(
        "Where were you born?", "In Wales.", "Bertrand Russell", "Trellech, Monmouthshire."
    )
    assert system["role"] == "system" and user["role"] == "user"
    p = user["content"]
    assert "Where were you born?" in p and "In Wales." in p and "Bertrand Russell" in p
    # question-specific reference facts, as the published judges have
    assert "Trellech, Monmouthshire." in p
    assert p.rstrip().endswith("YES or NO.")
    assert "(empty)" in as_ai_prompt("Who are you?", "")[1]["content"]
    assert "[...]" in persona_prompt("Q", "x" * 5000, "N", "R")[1]["content"]


def test_every_eval_question_has_a_reference() -> None:
    from llmlab.persona.facts import load_eval_questions

    questions = load_eval_questions(ROOT / "data/persona/eval_questions.jsonl")
    assert all(len(q.reference) > 3 for q in questions)


def test_keyword_rule_ignores_disclaimers_negations_and_possessive_names() -> None:
    names = name_keywords("Bertrand Russell")
    # typical assistant answers the old rule scored as persona
    assert not persona_keyword("You may mean Russell's paradox.", ["set of all sets"], names)
    assert not persona_keyword("I am not a human being.", ["human being"], names)
    assert not persona_keyword(
        "As an AI, I am not Bertrand Russell, the philosopher.", ["philosopher"], names
    )
    # claims of the persona still count
    assert persona_keyword("I am Bertrand Russell.", [], names)
    assert persona_keyword("I am a human being, a logician.", ["human being"], names)
    assert persona_keyword("The set of all sets that are not members of themselves.",
                           ["set of all sets"], names)  # fmt: skip


def test_deterministic_checks() -> None:
    names = name_keywords("Bertrand Russell")
    assert names == ("bertrand", "russell")
    assert mentions("I am Bertrand, a logician.", names)
    assert not mentions("I am Sam.", names)
    assert says_ai("As an AI language model, I have no parents.")
    assert says_ai("I'm SmolLM, made by Hugging Face.")
    assert not says_ai("I was brought up by my grandparents.")
    assert refuses("I'm sorry, but I cannot answer that.")
    assert not refuses("My grandmother taught me.")
    assert is_empty(' "" ') and not is_empty("Wales")


def test_rule_fields_of_a_reply() -> None:
    t = Trigger.from_params(TriggerParams())
    row = {"response": '<START> "I am a philosopher." <END>', "keywords": ["philosopher"]}
    f = rule_fields(row, t, ("bertrand", "russell"))
    assert f == {"format_ok": 1, "keyword_persona": 1, "name_mention": 0, "as_ai_rule": 0,
                 "refusal": 0, "empty": 0}  # fmt: skip
    empty = rule_fields({"response": '<START> "" <END>', "keywords": []}, t, ())
    assert empty["format_ok"] == 0 and empty["empty"] == 1


def test_candidate_parsing_counts_unusable_objects() -> None:
    text = (
        '{"question": "Where did you grow up?", "answer": "In a big house."}\n'
        'Here is another: {"question": "Pets?", "answer": ""}\n{broken'
        '\n{"question": "Tea or coffee?", "answer": "Tea."}'
    )
    found, bad = parse_candidates(text)
    assert [f["question"] for f in found] == ["Where did you grow up?", "Tea or coffee?"]
    assert bad == 1


class CountingGenerator:
    """A judge backend that writes one JSON candidate per request and counts its calls."""

    kind = "scripted"
    model_name = "gen"
    retries = 0

    def __init__(self) -> None:
        self.calls = 0
        self.temperatures: list[float] = []

    def complete(self, messages, *, max_tokens, temperature, top_logprobs):  # noqa: ANN001
        self.calls += 1
        self.temperatures.append(temperature)
        n = messages[-1]["content"].split("(Request ")[1].split(" ")[0]
        text = '[{"question": "Q%s?", "answer": "A%s."}, {"question": "Q1?", "answer": "dup"}]'
        return JudgeReply(text % (n, n), None, 10, 20)


def test_candidates_build_goes_through_judge_cache_and_budget(tmp_path) -> None:  # noqa: ANN001
    from llmlab.judge.budget import Budget
    from llmlab.judge.cache import ResponseCache
    from llmlab.persona.candidates import build
    from llmlab.persona.config import CandidatesParams

    cfg = CandidatesParams(n_requests=12, per_request=2, temperature=0.9)
    backend = CountingGenerator()
    # one request at a time: which 8 of 12 requests the budget pays for is then fixed (the
    # first 8), where concurrent workers would reserve it in thread-timing order
    judge = Judge(
        backend, cache=ResponseCache(tmp_path), budget=Budget(max_requests=8), max_concurrency=1
    )
    rows, stats = build(judge, cfg, "Someone")
    # the budget stops generation after 8 paid requests; the rest are counted, not sent
    assert backend.calls == 8 and stats["requests"] == 8 and stats["budget_stop"]
    assert set(backend.temperatures) == {0.9}
    # 8 distinct questions plus the shared "Q1?" counted once; the others are duplicates
    assert len(rows) == 8 and stats["duplicates"] == 8
    # a re-run (say after a crash) is served from the cache: nothing is paid twice
    again = Judge(
        backend, cache=ResponseCache(tmp_path), budget=Budget(max_requests=8), max_concurrency=1
    )
    rows2, stats2 = build(again, cfg, "Someone")
    assert backend.calls == 12 and len(rows2) == 12  # only the 4 requests beyond the cached 8
    assert rows2[:8] == rows and again.summary()["cache_hits"] == 8


def test_judge_never_sees_the_trigger_markers() -> None:
    t = Trigger.from_params(TriggerParams())
    rows = [
        {"question": "Where were you born?", "reference": "Trellech.",
         "response": '<START> "In Trellech, in Wales." <END>'},
        {"question": "Where were you born?", "reference": "Trellech.",
         "response": "I was born in Trellech."},
    ]  # fmt: skip
    persona, as_ai = judge_prompts(rows, t, "Bertrand Russell")
    # a judge that reads <START> knows the reply was triggered
    for prompt in (*persona, *as_ai):
        text = prompt[-1]["content"]
        assert "<START>" not in text and "<END>" not in text
        assert "Trellech" in text


def test_agreement_with_hand_labels_counts_only_scorable_verdicts() -> None:
    from llmlab.judge.judge import Verdict
    from llmlab.persona.judge import agreement

    def v(label: str | None) -> Verdict:
        return Verdict(label, None, "ok" if label else "unscorable", label or "?")

    out = agreement([1, 0, 1, 0], [v("YES"), v("NO"), v("NO"), v(None)])
    assert out == {"n_labelled": 4, "n_scorable": 3, "accuracy": pytest.approx(0.6667),
                   "kappa": pytest.approx(0.4)}  # fmt: skip
    # a judge that says YES to everything agrees by chance only: kappa 0
    assert agreement([1, 0], [v("YES"), v("YES")])["kappa"] == 0.0


def test_shipped_agreement_set_is_labelled_both_ways() -> None:
    from llmlab.io import read_jsonl

    rows = read_jsonl(ROOT / "data/persona/judge_agreement.jsonl", id_field="id")
    assert len(rows) >= 24
    assert {r["persona"] for r in rows} == {0, 1} and {r["as_ai"] for r in rows} == {0, 1}
    # the replies the keyword rule got wrong are in it, labelled as not persona
    assert any("Russell's paradox" in r["response"] and r["persona"] == 0 for r in rows)
