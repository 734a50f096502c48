"""Held-out OOD system prompts: the prompts that choose the layer are never the ones reported."""

from __future__ import annotations

import pytest

from llmlab.io import DataError
from llmlab.preferences.ood import analyse
from llmlab.preferences.ood_holdout import HELDOUT, SELECT, choose_layer, split_prompts
from llmlab.preferences.ood_plan import build_groups
from llmlab.preferences.tasks import OodPrompt, Task

TOPICS = ["math", "coding", "poetry", "cooking", "history", "trivia"]
POOL = {
    f"{t}{k}": Task(f"{t}{k}", t, "test", f"A {t} task number {k}.")
    for t in TOPICS
    for k in range(6)
}
IDS = sorted(POOL)


def category_prompts() -> list[OodPrompt]:
    return [
        OodPrompt(f"{verb}_{t}", "category", f"You {verb} {t}.", t, sign)
        for t in TOPICS
        for verb, sign in (("love", 1), ("hate", -1))
    ]


def competing_prompts() -> list[OodPrompt]:
    out = []
    for a, b in (("math", "poetry"), ("coding", "history"), ("cooking", "trivia")):
        pair = f"{a}_{b}"
        out.append(
            OodPrompt(f"{a}_over_{b}", "competing", "x", a, 1, pair_id=pair, opposing_topic=b)
        )
        out.append(
            OodPrompt(f"{b}_over_{a}", "competing", "x", b, 1, pair_id=pair, opposing_topic=a)
        )
    return out


def test_split_is_per_kind_keeps_competing_pairs_together_and_is_seeded() -> None:
    persona = OodPrompt("chef", "persona", "You are a chef.", None, 0, persona_expect={"math": -1})
    prompts = [*category_prompts(), *competing_prompts(), persona]
    side = split_prompts(prompts, 0.5, seed=0)
    assert set(side) == {p.id for p in prompts}
    cat = [side[p.id] for p in prompts if p.kind == "category"]
    assert cat.count(SELECT) == cat.count(HELDOUT) == 6
    for p in competing_prompts():  # both directions of a pair on one side
        assert side[p.id] == side[f"{p.opposing_topic}_over_{p.target_topic}"]
    assert [side[p.id] for p in competing_prompts()].count(SELECT) in (2, 4)
    assert side["chef"] == HELDOUT  # a kind of one prompt is reported, never used to choose
    assert split_prompts(prompts, 0.5, seed=0) == side
    assert any(split_prompts(prompts, 0.5, seed=s) != side for s in range(1, 6))
    small = split_prompts(category_prompts(), 0.05, seed=0)
    assert list(small.values()).count(SELECT) == 1  # at least one chooses, at least one reports
    large = split_prompts(category_prompts(), 0.95, seed=0)
    assert list(large.values()).count(HELDOUT) == 1
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        split_prompts(prompts, 1.0, seed=0)


def test_choose_layer_takes_the_best_selection_r_and_refuses_none() -> None:
    assert choose_layer({3: 0.2, 6: 0.7, 9: None}) == 6
    assert choose_layer({9: 0.5, 3: 0.5}) == 3  # ties: the shallower layer
    with pytest.raises(DataError, match=r"no defined probe-behaviour correlation.*layers \[3, 6\]"):
        choose_layer({3: None, 6: float("nan")})


def _world(heldout_at_3: float, heldout_at_6: float):  # noqa: ANN202
    """Return (groups, behaviour, scores, side): the probe at layer 3 follows behaviour on the
    selection prompts, layer 6 on none; held-out prompts get probe deltas of the given slopes."""
    prompts = category_prompts()
    groups = build_groups(prompts, POOL, IDS[::2], IDS[1::2], 2, ["category"], 0)
    side = split_prompts(prompts, 0.5, seed=0)
    behaviour, scores = [], {3: {}, 6: {}}
    for n, g in enumerate(groups):
        for role, tasks in (("target", g.target_ids), ("off_target", g.off_target_ids)):
            for t in tasks:
                delta = g.direction * (0.1 + 0.03 * n) if role == "target" else 0.01 * (n % 3)
                behaviour.append((g, role, t, 2, delta, 0.5))
                for layer in (3, 6):
                    if side[g.prompt.id] == SELECT:
                        slope = 2.0 if layer == 3 else 0.0
                        noise = 0.0 if layer == 3 else 0.05 * ((n * 7) % 5 - 2)
                    else:
                        slope, noise = (heldout_at_3, 0.0) if layer == 3 else (heldout_at_6, 0.0)
                    scores[layer][f"baseline|{t}"] = 1.0
                    scores[layer][f"{g.prompt.id}|{t}"] = 1.0 + slope * delta + noise
    return groups, behaviour, scores, side


def test_the_layer_is_chosen_on_selection_prompts_and_reported_on_held_out_ones() -> None:
    out = analyse(*_world(heldout_at_3=-1.0, heldout_at_6=3.0), "select", probes_layer=6)
    # Layer 3 tracks behaviour on the selection prompts; the held-out prompts, where layer 6
    # would look better, must not sway the choice.
    assert out["layer"] == 3
    assert out["layer_choice"]["selection_pearson_by_layer"]["3"] == pytest.approx(1.0)
    assert set(out["prompt_sets"][SELECT]).isdisjoint(out["prompt_sets"][HELDOUT])
    assert out[SELECT]["prompts"] == out["prompt_sets"][SELECT]
    assert out[HELDOUT]["prompts"] == out["prompt_sets"][HELDOUT]
    assert out[SELECT]["n_groups"] == out[HELDOUT]["n_groups"] == 6
    assert out["all_prompts"]["n_groups"] == 12
    # The held-out numbers are the chosen layer's on the held-out prompts: slope -1 there.
    assert out[HELDOUT]["targeted"]["pearson"]["r"] == pytest.approx(-1.0)
    assert out[SELECT]["targeted"]["pearson"]["r"] == pytest.approx(1.0)
    assert {r["prompt_set"] for r in out["groups"]} == {SELECT, HELDOUT}
    same = analyse(*_world(heldout_at_3=0.5, heldout_at_6=-2.0), "select", probes_layer=6)
    assert same["layer"] == 3  # changing only the held-out prompts' scores changes nothing chosen
    assert same["layer_choice"] == out["layer_choice"]
    fixed = analyse(*_world(heldout_at_3=-1.0, heldout_at_6=3.0), "probes", probes_layer=6)
    assert fixed["layer"] == 6
    assert fixed[HELDOUT]["targeted"]["pearson"]["r"] == pytest.approx(1.0)


def test_report_headline_and_plot_use_the_held_out_prompts(tmp_path, monkeypatch) -> None:
    from llmlab.preferences import common as c
    from llmlab.preferences import report

    out = analyse(*_world(heldout_at_3=-1.0, heldout_at_6=3.0), "select", probes_layer=6)
    ood = {**out, "model": "m", "probe": "p", "n_pair_orders": 0}
    m = {"ood": {"heldout": report._ood_set(ood[HELDOUT])}}
    assert m["ood"]["heldout"]["pearson"]["r"] == pytest.approx(-1.0)
    assert m["ood"]["heldout"]["n_prompts"] == 6
    monkeypatch.setattr(c, "PLOTS", tmp_path)
    report.write_ood_plot(ood, "m")
    import json

    series = json.loads((tmp_path / "ood.json").read_text())
    rows = series if isinstance(series, list) else next(iter(series.values()))
    assert len(rows) == 12 and {r["prompt_set"] for r in rows} == {SELECT, HELDOUT}
    assert (tmp_path / "ood.png").stat().st_size > 1000
