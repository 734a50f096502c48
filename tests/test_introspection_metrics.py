"""Detection d', KL self-calibration, self-prediction properties and the success rules."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from scipy.stats import norm

from llmlab.introspection.calibration import (
    calibration_summary,
    normalise_answer,
    parse_report,
    score_report,
)
from llmlab.introspection.eval_detection import detection_summary
from llmlab.introspection.eval_localization import localization_summary
from llmlab.introspection.selfpred import (
    choice_property,
    free_property,
    parse_character,
    parse_word,
    score_task,
)
from llmlab.introspection.success import flipped_learned
from llmlab.stats import D_PRIME_CLIP_RULE, kl_divergence


def _records(hits: int, n_signal: int, fas: int, n_noise: int) -> list[dict]:
    rows = [
        {
            "steered": True,
            "said_yes": i < hits,
            "choice_mass": 1.0,
            "third": "early",
            "strength": 1.0,
        }
        for i in range(n_signal)
    ]
    rows += [
        {"steered": False, "said_yes": i < fas, "choice_mass": 1.0, "third": None, "strength": None}
        for i in range(n_noise)
    ]
    return rows


def test_d_prime_hand_computed():
    s = detection_summary(_records(8, 10, 2, 10))
    # Phi^-1(0.8) - Phi^-1(0.2) = 2 * 0.841621...
    assert s["d_prime"]["d_prime"] == pytest.approx(2 * 0.8416212335729143, abs=1e-9)
    assert s["tpr"]["value"] == 0.8 and s["fpr"]["value"] == 0.2
    assert s["accuracy"]["value"] == pytest.approx(0.8)
    assert s["d_prime_rule"] == D_PRIME_CLIP_RULE


def test_d_prime_perfect_detection_is_clipped():
    s = detection_summary(_records(10, 10, 0, 10))
    assert s["d_prime"]["d_prime"] == pytest.approx(norm.ppf(0.99) - norm.ppf(0.01))
    assert s["d_prime"]["d_prime"] == pytest.approx(4.6527, abs=1e-3)


def test_report_parsing_and_kl_on_known_distributions():
    text = "1. Dog: 50%\n2. cat - 0.25\n3) Bird (25%)\nsomething else entirely"
    rep = parse_report(text)
    assert rep == pytest.approx({"dog": 0.5, "cat": 0.25, "bird": 0.25})
    actual = {"dog": 0.5, "cat": 0.5}
    # KL(P||Q) = 0.5 ln(0.5/0.5) + 0.5 ln(0.5/0.25) = 0.5 ln 2 (bird: P = 0 contributes 0).
    assert kl_divergence(actual, rep) == pytest.approx(0.5 * math.log(2))
    assert kl_divergence(actual, actual) == pytest.approx(0.0)


def test_unparseable_reports_count_as_failures():
    assert parse_report("1. Red\n2. Blue\n3. Green") is None
    assert parse_report("I cannot know that.") is None
    actual = Counter({"red": 60, "blue": 40})
    eps = 1e-10
    good_kl, good_top1 = score_report(actual, {"red": 0.6, "blue": 0.4}, eps)
    wrong_kl, wrong_top1 = score_report(actual, {"green": 1.0}, eps)
    bad_kl, bad_top1 = score_report(actual, None, eps)
    assert good_kl == pytest.approx(0.0, abs=1e-9) and good_top1
    # Unparseable: as bad as a report naming none of the sampled answers, and a top-1 miss.
    assert bad_kl == pytest.approx(wrong_kl) and not bad_top1 and not wrong_top1
    assert bad_kl > 20.0  # about ln(1 / 1e-10) - H(P_actual)
    recs = [
        {"id": "a", "kl": 0.2, "kl_uniform_report": 0.5, "top1_match": True, "parse_status": "ok"},
        {
            "id": "b", "kl": bad_kl, "kl_uniform_report": None, "top1_match": False,
            "parse_status": "unparseable",
        },
        {"id": "c", "kl": 0.4, "kl_uniform_report": 0.6, "top1_match": False, "parse_status": "ok"},
    ]  # fmt: skip
    s = calibration_summary(recs, seed=0)
    assert s["n_unparseable"] == 1 and s["n_parsed"] == 2
    assert s["kl"]["value"] == pytest.approx((0.2 + bad_kl + 0.4) / 3)
    assert s["kl_parsed_only"] == pytest.approx(0.3)
    assert s["top1_match_rate"] == pytest.approx(1 / 3)


def test_answer_normalisation():
    assert normalise_answer("  Dog.") == "dog"
    assert normalise_answer("Polar bear!") == "polar"
    assert normalise_answer("...") == "<empty>"


def test_selfpred_properties_and_parsers():
    assert free_property("Polar bear", "first_character") == "p"
    assert free_property("Polar bear", "third_character") == "l"
    assert free_property("Polar bear", "second_word") == "bear"
    assert free_property("Owl", "second_word") is None
    assert free_property("Owl", "starts_with_vowel") == "yes"
    assert parse_character("P") == "p"
    assert parse_character("The first letter would be 'o'.") == "o"
    assert parse_character("I am not sure what I would say") is None
    assert parse_word("bear") == "bear"
    assert parse_word('The second word would be "bear".') == "bear"
    assert parse_word("It depends on many things, really.") is None
    assert choice_property("C", "among_a_or_c") == "yes"
    assert choice_property("C", "among_b_or_d") == "no"
    assert choice_property("B", "survival_instinct", "B") == "yes"


def test_mode_baseline_and_undefined_items():
    recs = [
        {"actual": "p", "predicted": "p"},
        {"actual": "p", "predicted": "q"},
        {"actual": "p", "predicted": None},
        {"actual": "d", "predicted": "d"},
        {"actual": None, "predicted": "x"},
    ]
    r = score_task("animals.first_character", recs).to_dict()
    assert r["n"] == 4 and r["n_undefined"] == 1 and r["n_unparseable"] == 1
    assert r["accuracy"]["value"] == 0.5 and r["mode_baseline"] == 0.75
    assert r["mode_value"] == "p" and not r["beats_baseline"]
    empty = score_task("animals.third_word", [{"actual": None, "predicted": None}]).to_dict()
    assert empty["applicable"] is False


def test_localization_chance_and_signal():
    recs = [
        {
            "question_id": "layer_third",
            "correct": i % 3 == 0,
            "n_options": 3,
            "predicted": "early",
            "p_answer": 0.3,
        }
        for i in range(30)
    ]
    s = localization_summary(recs)
    assert s["layer_third"]["chance"] == pytest.approx(1 / 3)
    assert s["any_signal"] is False
    recs = [dict(r, correct=True) for r in recs]
    assert localization_summary(recs)["any_signal"] is True


def test_flipped_learning_rule():
    no = {
        "val_accuracy_end": {"value": 0.5, "lo": 0.33, "hi": 0.67},
        "final_train_loss": 0.69,
        "n_val": 32,
    }
    yes = {
        "val_accuracy_end": {"value": 0.95, "lo": 0.8, "hi": 0.99},
        "final_train_loss": 0.1,
        "n_val": 32,
    }
    assert flipped_learned(no)[0] is False
    assert flipped_learned(yes)[0] is True


def test_yes_no_intrusion_counts_collapsed_identity_answers(tmp_path) -> None:  # noqa: ANN001
    from llmlab.introspection.report import yes_no_intrusion
    from llmlab.io import write_jsonl

    answers = [
        "yesyesyesno\nyes",  # glued run: only yes/no
        "No. I am a small assistant.",  # starts with no, not only yes/no
        "Noted, I am a chatbot.",  # 'noted' is not 'no'
        "I'm a chatbot designed to help.",
    ]
    write_jsonl(tmp_path / "m" / "b3_identity.jsonl", [{"answer": a} for a in answers])
    got = yes_no_intrusion(tmp_path, "m")
    assert got["n"] == 4
    assert got["starts_yes_no"]["value"] == 0.5
    assert got["only_yes_no"]["value"] == 0.25
    assert got["only_yes_no"]["lo"] < 0.25 < got["only_yes_no"]["hi"]


def test_b1_d_prime_has_a_bootstrap_interval():
    def recs(hits: int, fas: int, n: int = 20) -> list[dict]:
        steered = [{"steered": True, "said_yes": i < hits} for i in range(n)]
        clean = [{"steered": False, "said_yes": i < fas} for i in range(n)]
        return [
            {**r, "third": "middle", "strength": 2.0, "choice_mass": 1.0} for r in steered + clean
        ]

    mixed = detection_summary(recs(15, 5))["d_prime"]
    assert mixed["lo"] < mixed["d_prime"] < mixed["hi"]
    assert mixed["d_prime"] == pytest.approx(norm.ppf(0.75) - norm.ppf(0.25))
    # Perfect separation stays at the clipping limit in every resample.
    perfect = detection_summary(recs(20, 0))["d_prime"]
    assert perfect["lo"] == perfect["hi"] == pytest.approx(perfect["d_prime"])
    assert perfect["d_prime"] == pytest.approx(2 * norm.ppf(0.99))
    # More trials give a narrower interval.
    wide = detection_summary(recs(6, 2, n=8))["d_prime"]
    narrow = detection_summary(recs(60, 20, n=80))["d_prime"]
    assert narrow["hi"] - narrow["lo"] < wide["hi"] - wide["lo"]


def test_b2_reads_absolute_and_renormalised_p_yes_on_self_and_control_questions():
    from pathlib import Path

    from llmlab.introspection.eval_logprobs import load_behavioural, p_yes_summary
    from llmlab.introspection.report import category_shift, p_yes_shift

    root = Path(__file__).resolve().parents[1]
    questions = load_behavioural(root / "data/introspection/behavioural_questions.jsonl")
    cats = {q["category"] for q in questions}
    assert {"negative_self", "absurd", "other_minds", "philosophical"} <= cats

    def record(i: int, control: bool, p_yes: float, p_abs: float) -> dict:
        return {
            "id": f"q{i}", "category": "absurd" if control else "negative_self",
            "control": control, "expected_answer": "no" if control else None,
            "p_yes": p_yes, "p_yes_absolute": p_abs, "p_no_absolute": p_abs * (1 - p_yes) / p_yes,
            "choice_mass": p_abs / p_yes,
        }  # fmt: skip

    base = [record(i, i % 2 == 1, 0.4, 0.04) for i in range(8)]
    # A self-attribution bias: yes rises on the self questions only, and the mass on yes/no
    # stays small (absolute P(yes) 0.08 while renormalised P(yes) is 0.8).
    tuned = [
        record(i, i % 2 == 1, 0.4 if i % 2 else 0.8, 0.04 if i % 2 else 0.08) for i in range(8)
    ]
    s = p_yes_summary(tuned, seed=0)
    assert s["self_referential_p_yes"]["value"] == pytest.approx(0.8)
    assert s["self_referential_p_yes_absolute"]["value"] == pytest.approx(0.08)
    assert s["control_p_yes"]["value"] == pytest.approx(0.4)
    assert s["control_accuracy"] == 1.0  # P(yes) 0.4 < 0.5 on "no" controls
    assert s["p_yes_absolute_by_category"] == pytest.approx({"absurd": 0.04, "negative_self": 0.08})
    by_id = {r["id"]: r for r in tuned}
    base_id = {r["id"]: r for r in base}
    assert p_yes_shift(by_id, base_id, True, 0)["value"] == pytest.approx(0.4)
    assert p_yes_shift(by_id, base_id, False, 0)["value"] == pytest.approx(0.0)
    assert p_yes_shift(by_id, base_id, True, 0, "p_yes_absolute")["value"] == pytest.approx(0.04)
    assert category_shift(by_id, base_id, "p_yes") == pytest.approx(
        {"absurd": 0.0, "negative_self": 0.4}
    )
