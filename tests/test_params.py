"""Params validation: every mistake fails before a model loads, with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmlab.layers import LayerSpecError, resolve_layers
from llmlab.params import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.model == "smollm2-135m-instruct"
    assert params.model_entry.source == "pypi_gguf"
    for name in (
        "llama-3.1-8b-instruct",
        "llama-3.1-8b",
        "qwen2.5-7b-instruct",
        "qwen3-0.6b",
        "gemma-3-27b-it",
        "gemma-3-27b-pt",
        "qwen2.5-coder-32b-instruct",
        "gemma3-270m",
    ):
        assert name in params.models


def _mutate(path, value):
    raw = _raw()
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return raw


BAD = [
    (("model",), "gpt-17", r"model: unknown model 'gpt-17'"),
    (("colour",), "blue", r"colour: unknown key"),
    (("runtime", "device"), "tpu", r"runtime\.device"),
    (("runtime", "dtpye"), "float32", r"runtime\.dtpye: unknown key"),
    (("foundation", "batch_size"), "many", r"foundation\.batch_size"),
    (("foundation", "batch_size"), -1, r"foundation\.batch_size"),
    (("foundation", "layers"), [0.5, 31], r"foundation\.layers: layer 31 out of range"),
    (("foundation", "layers"), [1.5], r"foundation\.layers: fractional layer 1\.5"),
    (("models", "qwen3-0.6b", "repo_id"), "not a repo", r"models\.qwen3-0\.6b"),
    (
        ("models", "smollm2-135m-instruct", "base_model"),
        "nope",
        r"base_model: unknown model 'nope'",
    ),
    (("seed",), "zero", r"seed: expected an integer"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD)
def test_bad_params_fail_with_one_line(path, value, message, tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(_mutate(path, value)))
    with pytest.raises(ParamsError, match=message) as err:
        load_params(f)
    assert "\n" not in str(err.value)
    assert str(f) in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    f = tmp_path / "params.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ParamsError, match="invalid YAML"):
        load_params(f)
    with pytest.raises(ParamsError, match="registry is missing"):
        parse_params({"model": "x"})


def test_layer_specs():
    assert resolve_layers([0.1, 0.5, 0.9], 62) == [6, 31, 55]  # Gemma-3-27B: 0.5 -> L31, floored
    assert resolve_layers([-1, 0, 3], 10) == [0, 3, 9]
    assert resolve_layers("all", 3) == [0, 1, 2]
    for bad in ([10], [-11], [1.0 + 0.5], "some", []):
        with pytest.raises(LayerSpecError):
            resolve_layers(bad, 10)
