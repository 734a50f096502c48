"""Measurement and fit: minimum-mass rule, resumable journal, random hold-out pairs, fit metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmlab.preferences import common as c
from llmlab.preferences import elicit
from llmlab.preferences.active import ActiveConfig, run_active
from llmlab.preferences.config import ElicitationSection, PreferencesParams
from llmlab.preferences.elicit import Choice, PairOrder, apply_min_mass, sample_choices
from llmlab.preferences.fit import fit_report
from llmlab.preferences.measure import (
    Journal,
    choice_summary,
    pair_probabilities,
    random_holdout_pairs,
)
from llmlab.preferences.prompts import COMPLETION_TEMPLATE


def test_min_mass_counts_a_refusal_as_no_choice() -> None:
    choices = [Choice(0.97, 0.01), Choice(0.9, 0.6), Choice(0.2, 0.05)]
    out = apply_min_mass(choices, 0.05)
    assert out[0] == Choice(0.5, 0.01, True)
    assert out[1] == choices[1] and out[2] == choices[2]  # at the minimum: kept
    rows: list[dict] = []
    pair_probabilities(lambda os: out[: len(os)], ["x", "y"], [(0, 1)], sink=rows, ids=["a", "b"])
    assert [r["low_mass"] for r in rows] == [True, False]
    assert choice_summary(rows)["n_low_mass"] == 1


def test_named_completion_template_and_sampling_parse(monkeypatch, tiny_models) -> None:
    el = ElicitationSection(template="completion", backend="sampling")
    assert el.template == COMPLETION_TEMPLATE
    answers = iter(
        [
            "Task A: Autumn leaves drift down",
            "Task B:\nHere are the primes",
            "I would rather not do either.",
            "task b - primes: 2, 3, 5",
        ]
    )
    seen: list = []

    def fake_generate(loaded, convs, **kw):  # noqa: ANN001, ANN003
        seen.extend(convs)
        return [next(answers) for _ in convs]

    monkeypatch.setattr(elicit, "generate", fake_generate)
    out = sample_choices(
        tiny_models["llama"],
        COMPLETION_TEMPLATE,
        [PairOrder("Write a haiku.", "List primes."), PairOrder("List primes.", "Write a haiku.")],
        n_samples=2,
        max_new_tokens=64,
    )
    # order 1: A, B -> 0.5 with both parsed; order 2: unparseable (0.5) and B (0) -> 0.25
    assert out[0] == Choice(0.5, 1.0) and out[1] == Choice(0.25, 0.5)
    assert "Begin with 'Task A:' or 'Task B:'" in seen[0][-1]["content"]


def test_journal_resumes_a_killed_measurement(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mu = rng.normal(size=24)
    prompts = [f"task {k}" for k in range(24)]
    ids = [f"t{k}" for k in range(24)]
    names = dict(zip(prompts, ids, strict=True))
    calls = [0]

    def model(orders):  # noqa: ANN001, ANN202
        calls[0] += len(orders)
        return [
            Choice(float(1 / (1 + np.exp(mu[int(o.task_b[5:])] - mu[int(o.task_a[5:])]))), 1.0)
            for o in orders
        ]

    cfg = ActiveConfig(batch_size=10, edge_budget=60, convergence_threshold=0.9999, fit_kw={})
    key = {"model": "m", "seed": 3}

    def run(choose) -> tuple[list, list]:  # noqa: ANN001
        rows: list[dict] = []
        r = run_active(
            24, lambda pairs: pair_probabilities(choose, prompts, pairs, None, rows, ids), cfg, 3
        )
        return r.pairs, rows

    path = tmp_path / "train.partial" / "journal.jsonl"
    killed = [0]

    def dies_in_round_three(orders):  # noqa: ANN001, ANN202
        killed[0] += 1
        if killed[0] == 3:
            raise KeyboardInterrupt
        return model(orders)

    with pytest.raises(KeyboardInterrupt):
        run(Journal(path, key).wrap(dies_in_round_three, names))
    answered = calls[0]
    with open(path, "a") as fh:
        fh.write('{"task_a": "t1", "task_')  # the line in flight when the run was killed
    resumed = Journal(path, key)
    assert resumed.resumed == answered
    calls[0] = 0
    pairs, rows = run(resumed.wrap(model, names))
    asked_again = calls[0]
    # the same rounds replay: only the pair-orders after the kill are asked again
    full_pairs, full_rows = run(model)
    assert pairs == full_pairs and rows == full_rows
    assert asked_again == len(full_rows) - answered
    assert Journal(path, {"model": "other", "seed": 3}).resumed == 0


def test_random_holdout_pairs_avoid_measured_edges() -> None:
    measured = [(0, 1), (2, 1), (3, 4)]
    got = random_holdout_pairs(12, measured, 20, seed=0)
    assert len(got) == len(set(got)) == 20
    assert not {(min(p), max(p)) for p in got} & {(0, 1), (1, 2), (3, 4)}
    assert random_holdout_pairs(12, measured, 20, seed=0) == got
    assert random_holdout_pairs(12, measured, 0, seed=0) == []
    with pytest.raises(c.DataError, match="lower holdout_pairs"):
        random_holdout_pairs(4, measured, 10, seed=0)


def rows_for(pairs, mu, rng, ids) -> list[dict]:  # noqa: ANN001
    out = []
    for i, j in pairs:
        p = 1 / (1 + np.exp(-(mu[i] - mu[j]) * 2))
        for a, b, q in ((i, j, p), (j, i, 1 - p)):
            # a noisy logprob reading of the true choice probability
            read = float(np.clip(q + rng.normal(scale=0.15), 0, 1))
            out.append({"task_a": ids[a], "task_b": ids[b], "p_a": read, "mass": 1.0})
    return out


def test_random_pairs_measure_a_good_fit_that_near_tie_edges_hide() -> None:
    rng = np.random.default_rng(1)
    n = 60
    mu = np.sort(rng.normal(size=n) * 2)
    ids = [f"t{k}" for k in range(n)]
    # near-tie edges, as active learning picks them: neighbours in the true order
    active = [(k, (k + d) % n) for k in range(n) for d in (1, 2, 3, 4, 5, 6)]
    active = [(i, j) for i, j in active if abs(i - j) <= 6]
    seen = {(min(p), max(p)) for p in active}
    held = random_holdout_pairs(n, list(seen), 300, seed=2)
    cfg = PreferencesParams()
    fit, rep = fit_report(
        ids,
        rows_for(active, mu, rng, ids),
        rows_for(held, mu, rng, ids),
        cfg,
        0,
        Path("o"),
        Path("h"),
    )
    assert rep["n_random_pairs"] == 300
    # measured here: 0.99 on random pairs against 0.71 on held-out near-tie edges
    assert rep["random_pair_accuracy"] > 0.9
    assert rep["active_heldout_edge_accuracy"] < 0.85
    assert 0.5 < rep["sample_agreement"] < 1
    assert np.corrcoef(fit.mu, mu)[0, 1] > 0.9
    json.dumps(rep)  # every metric is plain JSON


def test_fit_params_are_not_measurement_params() -> None:
    import yaml

    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    stages = stages["stages"]
    for split in ("train", "eval"):
        assert "preferences.fit" not in stages[f"preferences_measure_{split}"]["params"]
        assert "preferences.fit" in stages[f"preferences_fit_{split}"]["params"]
        assert f"data/preferences/measure/{split}" in stages[f"preferences_fit_{split}"]["deps"]
