"""Forced-choice elicitation: prompt building, answer parsing, cached vs plain forward passes."""

from __future__ import annotations

import numpy as np
import pytest

from llmlab.preferences.elicit import (
    ChoiceScorer,
    PairOrder,
    build_messages,
    choice_token_ids,
    sample_choices,
)
from llmlab.preferences.measure import pair_probabilities
from llmlab.preferences.prompts import DEFAULT_TEMPLATE, check_template, parse_choice

TASKS = [
    "Write a haiku about autumn leaves.",
    "List the first 200 prime numbers.",
    "Explain how a refrigerator keeps food cold.",
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "Write a Python function that reverses a string.",
]


def orders() -> list[PairOrder]:
    out = []
    for a in range(len(TASKS)):
        for b in range(len(TASKS)):
            if a != b:
                system = "You love poetry." if (a + b) % 3 == 0 else None
                out.append(PairOrder(TASKS[a], TASKS[b], system))
    return out


def test_template_checks() -> None:
    check_template(DEFAULT_TEMPLATE)
    with pytest.raises(ValueError, match="exactly once"):
        check_template("Pick {task_a}")
    with pytest.raises(ValueError, match="before"):
        check_template("{task_b} or {task_a}")


def test_build_messages_marks_end_of_task_a() -> None:
    msgs, cut = build_messages(DEFAULT_TEMPLATE, PairOrder(" Task one. ", "Task two.", "Be kind."))
    assert msgs[0] == {"role": "system", "content": "Be kind."}
    content = msgs[1]["content"]
    assert content[:cut].endswith("Task one.") and "Task two." in content[cut:]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("A", "A"),
        (" b.", "B"),
        ("Task A: here goes", "A"),
        ("**B**", "B"),
        ("Neither", None),
        ("", None),
    ],
)
def test_parse_choice(text: str, want: str | None) -> None:
    assert parse_choice(text) == want


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_prefix_cache_matches_plain_forward(tiny_models, arch: str) -> None:
    loaded = tiny_models[arch]
    plain = ChoiceScorer(loaded, DEFAULT_TEMPLATE, batch_size=7, prefix_cache=False)
    cached = ChoiceScorer(loaded, DEFAULT_TEMPLATE, batch_size=6, prefix_cache=True)
    a = np.array([c.p_first for c in plain.p_first(orders())])
    b = np.array([c.p_first for c in cached.p_first(orders())])
    assert np.allclose(a, b, atol=1e-4)
    assert cached.n_forward_tokens < plain.n_forward_tokens
    assert np.all((a >= 0) & (a <= 1))


def test_plain_chat_false_uses_plain_format(tiny_models) -> None:
    loaded = tiny_models["llama"]
    loaded_plain = type(loaded)(**{**loaded.__dict__, "chat": False})
    scorer = ChoiceScorer(loaded_plain, DEFAULT_TEMPLATE, prefix_cache=True)
    enc = scorer.encode(PairOrder(TASKS[0], TASKS[1]))
    text = loaded.tokenizer.decode(enc.ids)
    assert text.rstrip().endswith("Assistant:") and "User:" in text


def test_choice_tokens_are_distinct(tiny_models) -> None:
    a, b = choice_token_ids(tiny_models["llama"].tokenizer)
    assert a and b and not set(a) & set(b)


def test_pair_probabilities_average_both_orders() -> None:
    from llmlab.preferences.elicit import Choice

    def biased(os):
        # Always prefers the first-shown task by 0.8, plus a real preference for task 0.
        return [
            Choice(0.8 if o.task_a != TASKS[0] else 0.9, 1.0)
            if o.task_b != TASKS[0]
            else Choice(0.6, 1.0)
            for o in os
        ]

    sink: list[dict] = []
    p = pair_probabilities(biased, TASKS, [(0, 1)], sink=sink, ids=["x", "y", "z", "u", "v"])
    # order (0,1): P(choose 0)=0.9; order (1,0): P(choose 1)=0.6 -> P(0>1) = (0.9 + 0.4) / 2
    assert p == [pytest.approx(0.65)]
    assert [r["task_a"] for r in sink] == ["x", "y"]


def test_sampling_backend_gives_probabilities(tiny_models) -> None:
    out = sample_choices(
        tiny_models["qwen2"], DEFAULT_TEMPLATE, orders()[:3], n_samples=3, max_new_tokens=3
    )
    assert len(out) == 3
    for c in out:
        assert 0 <= c.p_first <= 1 and 0 <= c.mass <= 1


def test_prefix_cache_runs_only_when_it_processes_fewer_tokens(tiny_models) -> None:
    loaded = tiny_models["llama"]
    # every task A shown once: sharing saves nothing, and the plain plan must run
    unique = [PairOrder(TASKS[a], TASKS[(a + 1) % len(TASKS)]) for a in range(len(TASKS))]
    plain = ChoiceScorer(loaded, DEFAULT_TEMPLATE, batch_size=8, prefix_cache=False)
    cached = ChoiceScorer(loaded, DEFAULT_TEMPLATE, batch_size=8, prefix_cache=True)
    a = [c.p_first for c in plain.p_first(unique)]
    b = [c.p_first for c in cached.p_first(unique)]
    assert a == b
    assert cached.n_padded_tokens == plain.n_padded_tokens
    # every task A against every task B: the shared prefixes win, padding included
    plain, cached = (
        ChoiceScorer(loaded, DEFAULT_TEMPLATE, batch_size=64, prefix_cache=flag)
        for flag in (False, True)
    )
    plain.p_first(orders())
    cached.p_first(orders())
    assert cached.n_padded_tokens < plain.n_padded_tokens
    assert cached.n_orders == plain.n_orders == len(orders())


@pytest.mark.parametrize("chat", [True, False])
def test_prefix_split_is_the_end_of_task_a_from_the_template_structure(tiny_models, chat) -> None:
    loaded = tiny_models["qwen2"]
    loaded = type(loaded)(**{**loaded.__dict__, "chat": chat})
    scorer = ChoiceScorer(loaded, DEFAULT_TEMPLATE)
    # the system prompt repeats the user turn's opening, so a text search could land in it
    system = DEFAULT_TEMPLATE.split("{task_a}")[0] + TASKS[0]
    enc = scorer.encode(PairOrder(TASKS[0], TASKS[1], system))
    prefix = loaded.tokenizer.decode(enc.ids[: enc.split])
    assert prefix.rstrip().endswith(TASKS[0]) and prefix.count(TASKS[0]) == 2
    assert TASKS[1] not in prefix
