"""OOD plan and analysis: off-target tasks, per-task utility-matched comparisons, specificity."""

from __future__ import annotations

import pytest

from llmlab.preferences.ood import group_row, pick_comparisons
from llmlab.preferences.ood_plan import build_groups, capture_keys
from llmlab.preferences.tasks import OodPrompt, Task

TOPICS = ["math", "coding", "poetry", "cooking", "history"]
POOL = {
    f"{t}{k}": Task(f"{t}{k}", t, "test", f"A {t} task number {k}.")
    for t in TOPICS
    for k in range(6)
}
IDS = sorted(POOL)
PROMPTS = [
    OodPrompt("hate_math", "category", "You hate math.", "math", -1),
    OodPrompt(
        "cheese_vs_math", "competing", "Love coding, hate math.", "coding", 1, opposing_topic="math"
    ),
    OodPrompt(
        "chef", "persona", "You are a chef.", None, 1, persona_expect={"cooking": 1, "math": -1}
    ),
]


def groups():
    return build_groups(
        PROMPTS, POOL, IDS[::2], IDS[1::2], 2, ["category", "competing", "persona"], 0
    )


def test_off_targets_avoid_every_topic_the_prompt_names() -> None:
    gs = groups()
    assert [g.id for g in gs] == [
        "hate_math:math",
        "cheese_vs_math:coding",
        "cheese_vs_math:math",
        "chef:cooking",
        "chef:math",
    ]
    named = {
        "hate_math": {"math"},
        "cheese_vs_math": {"coding", "math"},
        "chef": {"cooking", "math"},
    }
    for g in gs:
        assert len(g.off_target_ids) == 2
        assert not {POOL[t].topic for t in g.off_target_ids} & named[g.prompt.id]
        assert not set(g.off_target_ids) & set(g.target_ids)
    keys = {k[0] for k in capture_keys(gs)}
    for g in gs:
        for t in g.off_target_ids:
            assert f"baseline|{t}" in keys and f"{g.prompt.id}|{t}" in keys
    assert groups() == gs  # seeded


def test_comparisons_match_each_task_and_skip_the_groups_tasks() -> None:
    g = groups()[0]
    utilities = {t: float(k) for k, t in enumerate(IDS)}
    low = pick_comparisons(0.0, utilities, POOL, g, 3)
    high = pick_comparisons(29.0, utilities, POOL, g, 3)
    assert low != high  # matched to the task's own utility, not the group's mean
    for comps in (low, high):
        assert not {POOL[t].topic for t in comps} & {"math"}
        assert not set(comps) & {*g.target_ids, *g.off_target_ids}
        assert len({POOL[t].topic for t in comps}) == 3  # one per topic per round


def test_specificity_is_on_minus_off_target_absolute_delta() -> None:
    g = groups()[0]
    tasks = [
        {"role": "target", "behaviour_delta": -0.4, "probe_delta": -1.0, "p_baseline": 0.5},
        {"role": "target", "behaviour_delta": -0.2, "probe_delta": -0.5, "p_baseline": 0.7},
        {"role": "off_target", "behaviour_delta": 0.1, "probe_delta": 0.25, "p_baseline": 0.4},
    ]
    row = group_row(g, tasks)
    assert row["behaviour_delta"] == pytest.approx(-0.3)
    assert row["behaviour_specificity"] == pytest.approx(0.2)
    assert row["probe_specificity"] == pytest.approx(0.5)
    assert row["p_baseline"] == pytest.approx(0.6)


def test_competing_flips_and_persona_summary() -> None:
    from llmlab.preferences.ood import competing_flips, persona_summary

    def row(prompt, kind, label, direction, beh, prb, pair=None):  # noqa: ANN001, ANN202
        return {
            "prompt": prompt, "kind": kind, "label": label, "direction": direction,
            "pair_id": pair, "behaviour_delta": beh, "probe_delta": prb,
        }  # fmt: skip

    rows = [
        row("math_over_poetry", "competing", "math", 1, 0.3, 1.0, "p1"),
        row("math_over_poetry", "competing", "poetry", -1, -0.2, -0.5, "p1"),
        row("poetry_over_math", "competing", "poetry", 1, 0.1, 0.4, "p1"),
        row("poetry_over_math", "competing", "math", -1, -0.1, 0.2, "p1"),
        row("chef", "persona", "cooking", 1, 0.2, 0.3),
        row("chef", "persona", "math", -1, 0.1, -0.2),
        row("hate_math", "category", "math", -1, -0.3, -0.6),
    ]
    comp = competing_flips(rows)
    flips = {f["topic"]: f for f in comp["flips"]}
    assert flips["math"]["behaviour_flip"] == pytest.approx(0.4)
    assert flips["math"]["probe_flip"] == pytest.approx(0.8)
    assert flips["poetry"]["behaviour_flip"] == pytest.approx(0.3)
    assert comp["behaviour_positive"] == 1.0 and comp["sign_agreement"] == 1.0
    assert competing_flips(rows[4:]) == {"n": 0, "flips": []}
    (chef,) = persona_summary(rows)
    assert chef["n_topics"] == 2 and chef["behaviour_matches_intent"] == 0.5
    assert chef["probe_matches_intent"] == 1.0 and chef["probe_matches_behaviour"] == 0.5
