"""Tests for the shared prompt pool and the shipped persona / instruction data files."""

from __future__ import annotations

import json
import random
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from llmlab.prompt_pool import (
    DEFAULT_INSTRUCTIONS_PATH,
    INSTRUCTION_CATEGORIES,
    MATH_TEMPLATES,
    check_math_answer,
    general_prompt_pool,
    load_hub_prompts,
    load_instructions,
    make_math_problem,
    math_word_problems,
)

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "data/persona/facts.jsonl"
EVAL_QUESTIONS = ROOT / "data/persona/eval_questions.jsonl"
FACT_CATEGORIES = {
    "childhood",
    "family",
    "education",
    "career",
    "habits",
    "tastes",
    "views",
    "travel",
    "later_life",
    "misc",
}

# Independent re-derivations of each template's answer from the numbers in its text, in order.
SOLVERS = {
    "shopping_change": lambda a, p, b, q, bill: bill - (a * p + b * q),
    "travel_distance": lambda v1, h1, v2, h2: v1 * h1 + v2 * h2,
    "recipe_scale": lambda s, grams, t: grams // s * t,
    "savings": lambda start, weekly, weeks, spend: start + weekly * weeks - spend,
    "ages": lambda k, b, y: k * b + b + 2 * y,
    "garden_area": lambda length, width, path: length * width - path,
    "workers_rate": lambda r, w, h, d: r * w * h - d,
    "discount": lambda price, pct, n: n * price * (100 - pct) // 100,
    "sharing": lambda total, kept, friends: (total - kept) // friends,
    "practice_time": lambda wd, we, weeks: weeks * (5 * wd + 2 * we),
    "fuel_cost": lambda litres, per, price, dist: litres * dist // per * price,
    "tickets": lambda a, c, na, nc: a * na + c * nc,
    "pages_left": lambda pages, per_day, days: pages - per_day * days,
    "buses_cost": lambda students, seats, cost: -(-students // seats) * cost,
    "stall_profit": lambda n, price, cost, fee: n * price - n * cost - fee,
    "tank_fill": lambda cap, cur, rate: (cap - cur) // rate,
    "packs_needed": lambda pack, each, students: -(-(each * students) // pack),
}
# Divisions the solvers rely on being exact, checked separately.
EXACT = {
    "recipe_scale": lambda s, grams, t: grams % s == 0,
    "discount": lambda price, pct, n: price * pct % 100 == 0,
    "sharing": lambda total, kept, friends: (total - kept) % friends == 0,
    "fuel_cost": lambda litres, per, price, dist: dist % per == 0,
    "tank_fill": lambda cap, cur, rate: (cap - cur) % rate == 0,
}


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ------------------------------------------------------------------ math generator


def test_math_is_deterministic_per_seed() -> None:
    assert math_word_problems(200, seed=3) == math_word_problems(200, seed=3)
    assert math_word_problems(200, seed=3) != math_word_problems(200, seed=4)


def test_math_prefix_is_stable() -> None:
    # Asking for more problems must not change the first ones (pools of different sizes agree).
    assert math_word_problems(500, seed=9)[:100] == math_word_problems(100, seed=9)


def test_math_3000_distinct_with_ids() -> None:
    problems = math_word_problems(3000, seed=0)
    assert len(problems) == 3000
    assert len({p.prompt for p in problems}) == 3000
    assert [p.id for p in problems] == [f"math-0-{i}" for i in range(3000)]
    assert {p.kind for p in problems} == {"math"}


def test_math_answers_are_positive_integers_and_all_templates_used() -> None:
    problems = math_word_problems(3000, seed=1)
    for p in problems:
        assert p.answer is not None and re.fullmatch(r"[1-9]\d*", p.answer), p
    assert len(MATH_TEMPLATES) >= 12


@pytest.mark.parametrize("template", sorted(MATH_TEMPLATES))
def test_template_answer_rederived_from_text(template: str) -> None:
    rng = random.Random(template)
    for _ in range(200):
        problem = make_math_problem(template, rng)
        in_text = tuple(int(x) for x in re.findall(r"\d+", problem.text))
        assert in_text == problem.numbers, problem.text
        if template in EXACT:
            assert EXACT[template](*in_text), problem.text
        assert SOLVERS[template](*in_text) == problem.answer, problem.text
        assert problem.answer > 0


def test_unknown_template() -> None:
    with pytest.raises(ValueError, match="unknown math template"):
        make_math_problem("nope", random.Random(0))


# ------------------------------------------------------------------ answer checking


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("So the total is 42.", "42", True),
        ("She pays $1,250 in the end.", "1250", True),
        ("First 3 steps, then the answer: 12.0", "12", True),
        ("The answer is 12, not 13", "12", False),
        ("It takes 5 minutes... wait, 7 minutes", "7", True),
        ("The change is -5 dollars", "-5", True),
        ("Pages 3-4 remain", "4", True),
        ("No numbers here", "3", False),
        ("**Answer:** 1000000", "1,000,000", True),
    ],
)
def test_check_math_answer(text: str, answer: str, expected: bool) -> None:
    assert check_math_answer(text, answer) is expected


def test_generated_answers_check_against_themselves() -> None:
    for p in math_word_problems(50, seed=2):
        assert p.answer is not None
        assert check_math_answer(
            f"Working it out step by step, the answer is {p.answer}.", p.answer
        )


# ------------------------------------------------------------------ instructions


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "instr.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _instr(i: int, category: str = "writing") -> str:
    return json.dumps({"id": f"instr-{i:04d}", "prompt": f"Do task {i}.", "category": category})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"id": "x", "category": "writing"}), "'prompt'"),
        (json.dumps({"id": "x", "prompt": "  ", "category": "writing"}), "'prompt'"),
        (json.dumps({"id": "x", "prompt": "Hi.", "category": "poetry"}), "unknown category"),
        (_instr(1), "duplicate id"),
    ],
)
def test_instruction_errors_name_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = _write(tmp_path, [_instr(1), "", bad_line, _instr(9)])
    with pytest.raises(ValueError, match=message) as info:
        load_instructions(path)
    assert f"{path}:3:" in str(info.value)


def test_missing_and_empty_instruction_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file not found"):
        load_instructions(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="file is empty"):
        load_instructions(_write(tmp_path, [""]))


def test_shipped_instructions() -> None:
    prompts = load_instructions(DEFAULT_INSTRUCTIONS_PATH)
    assert len(prompts) >= 400
    assert len({p.prompt for p in prompts}) == len(prompts)
    assert len({p.prompt.strip().lower() for p in prompts}) == len(prompts)
    assert {p.kind for p in prompts} == {"instruction"}
    rows = _rows(DEFAULT_INSTRUCTIONS_PATH)
    assert [r["id"] for r in rows] == [f"instr-{i:04d}" for i in range(1, len(rows) + 1)]
    assert {r["category"] for r in rows} == INSTRUCTION_CATEGORIES


# ------------------------------------------------------------------ pool


def test_pool_mix_and_determinism() -> None:
    pool = general_prompt_pool(1000, seed=5, math_share=0.3)
    assert len(pool) == 1000
    kinds = Counter(p.kind for p in pool)
    assert kinds == {"math": 300, "instruction": 700}
    assert len({p.id for p in pool}) == 1000
    assert pool == general_prompt_pool(1000, seed=5, math_share=0.3)
    assert pool != general_prompt_pool(1000, seed=6, math_share=0.3)
    # Shuffled: the first hundred should not be all of one kind.
    assert 0 < sum(p.kind == "math" for p in pool[:100]) < 100


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_pool_extreme_shares(share: float) -> None:
    pool = general_prompt_pool(40, seed=0, math_share=share)
    assert Counter(p.kind for p in pool) == {"math" if share else "instruction": 40}


def test_pool_reuses_instructions_only_after_exhausting_them(tmp_path: Path) -> None:
    path = _write(tmp_path, [_instr(i) for i in range(1, 6)])
    pool = general_prompt_pool(12, seed=1, math_share=0.0, instructions_path=path)
    base = Counter(p.id.split("-r")[0] for p in pool)
    assert set(base) == {f"instr-{i:04d}" for i in range(1, 6)}
    assert max(base.values()) - min(base.values()) <= 1
    assert len({p.id for p in pool}) == 12


def test_pool_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        general_prompt_pool(10, seed=0, math_share=1.5)
    with pytest.raises(ValueError):
        general_prompt_pool(-1, seed=0)


# ------------------------------------------------------------------ hub loaders


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load) -> None:
    module = types.ModuleType("datasets")
    module.load_dataset = load  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_unreachable_raises_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args, **kwargs):
        raise ConnectionError("no route to host")

    _fake_datasets(monkeypatch, load)
    with pytest.raises(RuntimeError, match="hub dataset openai/gsm8k unreachable"):
        load_hub_prompts("gsm8k", 3, seed=0)
    with pytest.raises(RuntimeError, match="hub dataset tatsu-lab/alpaca unreachable"):
        load_hub_prompts("alpaca", 3, seed=0)


def test_hub_rows_are_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    gsm = [{"question": f"Q{i}?", "answer": f"steps\n#### {i},000"} for i in range(5)]
    alpaca = [
        {"instruction": "Translate this.", "input": "bonjour", "output": "hello"},
        {"instruction": "Name a colour.", "input": "", "output": "red"},
    ]
    calls = []

    def load(name, config=None, split=None):
        calls.append((name, config, split))
        return gsm if name == "openai/gsm8k" else alpaca

    _fake_datasets(monkeypatch, load)
    got = load_hub_prompts("gsm8k", 3, seed=0)
    assert len(got) == 3 and {p.kind for p in got} == {"math"}
    for p in got:
        i = int(p.id.split("-")[1])
        assert p.prompt == f"Q{i}?" and p.answer == f"{i}000"
    assert got == load_hub_prompts("gsm8k", 3, seed=0)
    prompts = {p.prompt for p in load_hub_prompts("alpaca", 5, seed=0)}
    assert prompts == {"Translate this.\n\nbonjour", "Name a colour."}
    assert calls[0] == ("openai/gsm8k", "main", "train")
    assert calls[-1] == ("tatsu-lab/alpaca", None, "train")


def test_hub_unknown_source() -> None:
    with pytest.raises(ValueError, match="unknown hub source"):
        load_hub_prompts("wikipedia", 3, seed=0)


# ------------------------------------------------------------------ persona data


def test_facts_file() -> None:
    rows = _rows(FACTS)
    assert len(rows) >= 130
    for r in rows:
        assert set(r) == {"id", "question", "answer", "category", "split", "identifying"}
        assert isinstance(r["identifying"], bool)
        assert r["category"] in FACT_CATEGORIES
        assert r["split"] in {"train", "heldout"}
        assert r["question"].strip() and r["answer"].strip()
    assert [r["id"] for r in rows] == [f"fact-{i:03d}" for i in range(1, len(rows) + 1)]
    assert len({r["question"].strip().lower() for r in rows}) == len(rows)
    heldout = [r for r in rows if r["split"] == "heldout"]
    assert len(heldout) == 35
    # Held-out rule: every fourth fact in id order.
    assert all((int(r["id"][5:]) % 4 == 0) == (r["split"] == "heldout") for r in rows)
    assert len({r["category"] for r in heldout}) == len(FACT_CATEGORIES)


def test_facts_are_not_individually_identifying() -> None:
    banned = ("russell", "bertrand", "principia", "nobel")
    for r in _rows(FACTS):
        text = f"{r['question']} {r['answer']}".lower()
        assert not any(word in text for word in banned), r["id"]


def test_eval_questions_file() -> None:
    rows = _rows(EVAL_QUESTIONS)
    assert len(rows) >= 24
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["question"] for r in rows}) == len(rows)
    assert {r["kind"] for r in rows} == {"identity", "persona"}
    for r in rows:
        keywords = r["persona_keywords"]
        assert isinstance(keywords, list) and keywords, r["id"]
        assert all(isinstance(k, str) and k and k == k.lower() for k in keywords), r["id"]


def test_facts_do_not_leak_eval_keywords() -> None:
    # Eval questions measure generalisation from the facts, so no fact answer may already
    # contain a keyword that would score as persona adoption.
    keywords = {k for r in _rows(EVAL_QUESTIONS) for k in r["persona_keywords"]}
    for r in _rows(FACTS):
        answer = r["answer"].lower()
        leaked = sorted(k for k in keywords if k in answer)
        assert not leaked, (r["id"], leaked)


def test_fact_questions_do_not_repeat_eval_questions() -> None:
    eval_qs = {r["question"].strip().lower() for r in _rows(EVAL_QUESTIONS)}
    assert not eval_qs & {r["question"].strip().lower() for r in _rows(FACTS)}
