"""Inoculation family: bad input gives one clear error naming the file, field or value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_params

from llmlab.inoculation.common import load_direction, resolve_prompts, save_direction
from llmlab.inoculation.config import PromptTexts
from llmlab.io import DataError
from llmlab.params import ParamsError


def test_direction_file_of_another_width(tmp_path: Path) -> None:
    d = tmp_path / "direction"
    save_direction(d, [0, 1], np.ones((2, 32), dtype=np.float32) / np.sqrt(32), {"model": "other"})
    with pytest.raises(
        DataError, match=r"directions\.safetensors: direction width 32 does not match .* 64"
    ):
        load_direction(d, hidden_size=64)
    ok = load_direction(d, hidden_size=32, layers=[1])
    assert ok.at(1).shape == (32,)
    with pytest.raises(DataError, match="no direction for layer 5"):
        load_direction(d, hidden_size=32, layers=[5])
    with pytest.raises(DataError, match="extracted from model 'other', not 'tiny'"):
        load_direction(d, hidden_size=32, model="tiny")


def test_empty_control_list_in_params(tiny_dirs) -> None:
    with pytest.raises(
        ParamsError, match=r"inoculation\.prompts\.control_candidates: .*empty control list"
    ):
        make_params(tiny_dirs["llama"], inoculation={"prompts": {"control_candidates": []}})


def test_empty_control_list_in_the_prompt_file(tmp_path: Path) -> None:
    f = tmp_path / "system_prompts.json"
    texts = {"neutral": "n", "promote": "p", "suppress": "s", "inoculation": "i"}
    f.write_text(json.dumps({**texts, "control_candidates": []}))
    with pytest.raises(
        DataError, match=r"system_prompts\.json: field 'control_candidates': empty control list"
    ):
        resolve_prompts(PromptTexts(), f)
    f.write_text(json.dumps({**texts, "inoculation": ""}))
    with pytest.raises(DataError, match=r"field 'inoculation' must be a non-empty string"):
        resolve_prompts(PromptTexts(control_candidates=["c"]), f)


def test_params_override_the_prompt_file(tmp_path: Path) -> None:
    f = tmp_path / "system_prompts.json"
    f.write_text(
        json.dumps(
            {
                "neutral": "n",
                "promote": "p",
                "suppress": "s",
                "inoculation": "i",
                "control_candidates": ["a", "b"],
            }
        )
    )
    got = resolve_prompts(PromptTexts(inoculation="custom", control_candidates=["only"]), f)
    assert got.inoculation == "custom" and got.control_candidates == ("only",)
    assert got.neutral == "n"


def test_bad_positions_and_layers_in_params(tiny_dirs) -> None:
    with pytest.raises(
        ParamsError, match=r"inoculation\.alignment\.positions: .*unknown position 'assistant_0'"
    ):
        make_params(
            tiny_dirs["llama"],
            inoculation={"alignment": {"positions": ["pre_assistant", "assistant_0"]}},
        )
    with pytest.raises(ParamsError, match=r"must include the canonical 'pre_assistant'"):
        make_params(tiny_dirs["llama"], inoculation={"alignment": {"positions": ["user_end"]}})
    with pytest.raises(ParamsError, match=r"inoculation\.alignment\.layers: layer 7 out of range"):
        make_params(tiny_dirs["llama"], inoculation={"alignment": {"layers": [7]}})
