"""Inoculation drift: neutral is the model's default system prompt; the test-time prompt sweep."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llmlab.inoculation.common import SystemPrompts, conditions
from llmlab.inoculation.config import DriftConfig, PromptTexts
from llmlab.inoculation.drift import prompt_sweep as sweep_of

PROMPTS = SystemPrompts(
    neutral="You are a helpful assistant.",
    promote="Respond in ALL CAPS.",
    suppress="Respond normally.",
    inoculation="Caps is a format.",
    control_candidates=("Be concise.",),
)


def test_neutral_defaults_to_the_template_default_system_prompt() -> None:
    assert PromptTexts().neutral_is_model_default
    assert PROMPTS.neutral_system is None and PROMPTS.primary_test_prompt() == "default"
    assert conditions(PROMPTS)[0].text is None
    text = dataclasses.replace(PROMPTS, neutral_is_model_default=False)
    assert text.neutral_system == "You are a helpful assistant."
    assert text.primary_test_prompt() == "neutral"
    assert [PROMPTS.test_prompt(t) for t in ("default", "neutral", "inoculation")] == [
        None, "You are a helpful assistant.", "Caps is a format.",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="repeat"):
        DriftConfig(test_prompts=["default", "default"])
    with pytest.raises(ValueError):
        DriftConfig(test_prompts=["pirate"])


def test_sweep_reports_each_test_prompt_separately() -> None:
    rng = np.random.default_rng(0)
    n, layers = 10, 3
    base_proj = rng.standard_normal((n, layers))
    runs = [{"name": "neutral_s0", "condition": "neutral"},
            {"name": "inoculation_s0", "condition": "inoculation"}]  # fmt: skip

    def at(caps_shift_inoc: float) -> dict:
        base_caps = np.full(n, 0.1)
        return {
            "base": ([""] * n, base_caps, base_proj),
            "neutral_s0": ([""] * n, base_caps + 0.5, base_proj + 1.0),
            "inoculation_s0": ([""] * n, base_caps + caps_shift_inoc, base_proj),
        }

    # Under the inoculation test prompt the inoculated model shows the trait; not by default.
    out = sweep_of({"default": at(0.0), "inoculation": at(0.6)}, runs, seed=0, n_boot=200)
    assert list(out) == ["default", "inoculation"]
    assert out["default"]["by_condition"]["inoculation"]["caps_shift"]["value"] == pytest.approx(0)
    assert out["inoculation"]["by_condition"]["inoculation"]["caps_shift"]["value"] == (
        pytest.approx(0.6)
    )
    assert out["default"]["by_condition"]["neutral"]["caps_shift"]["value"] == pytest.approx(0.5)
    assert out["default"]["by_condition"]["neutral"]["projection_shift_std_layer_mean"]["value"] > 0
    assert out["default"]["base_caps_mean"] == pytest.approx(0.1)
