"""configs/cpu_full.yaml: the larger CPU sizes, applied on top of params.yaml's small defaults."""

from __future__ import annotations

from pathlib import Path

import yaml

from llmlab.preset import flatten, preset_flags

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs/cpu_full.yaml"
PARAMS = ROOT / "params.yaml"


def lookup(tree: dict, dotted: str) -> object:
    node = tree
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted}: not in params.yaml"
        node = node[part]
    return node


def test_preset_validates_and_sets_every_key_as_a_flag() -> None:
    flags = preset_flags(PRESET, PARAMS)
    keys = [k for k, _ in flatten(yaml.safe_load(PRESET.read_text()))]
    assert [f.split()[1].split("=")[0] for f in flags] == keys
    assert "-S introspection.eval.b5.n_prompts=null" in flags


def test_preset_only_enlarges_existing_sizes() -> None:
    """Each key exists in params.yaml and the preset value is at least the default (null
    means every item, the largest), so params.yaml keeps the small CPU run. `*_every`
    intervals follow the number of steps, so they are only checked to exist."""
    params = yaml.safe_load(PARAMS.read_text())
    enlarged = 0
    for key, value in flatten(yaml.safe_load(PRESET.read_text())):
        default = lookup(params, key)
        # sizes are counts, or a float number of epochs
        assert isinstance(value, int | float | None) and not isinstance(value, bool), key
        assert isinstance(default, int | float | None), f"{key}: default {default!r} is not a size"
        if value is None:
            enlarged += default is not None
            continue
        assert default is not None, f"{key}: default null (all) is larger than {value}"
        if key.endswith("_every"):
            continue
        assert value >= default, f"{key}: preset {value} < default {default}"
        enlarged += value > default
    assert enlarged >= 20
