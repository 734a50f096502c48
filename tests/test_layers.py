"""Layer specs: one meaning per value, fractions floored, everything else refused."""

from __future__ import annotations

import math

import pytest

from llmlab.layers import LayerSpecError, check_layer_spec, resolve_layer, resolve_layers

FRACTIONS = [0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9]
# floor(fraction * depth), worked out by hand for each depth the registry and the seed use
# (Gemma-3-270M 18, Qwen2.5-7B / Qwen3-0.6B 28, SmolLM2-135M 30, Llama-3.1-8B 32,
# Gemma-3-27B 62). Products ending in .5 (0.25 * 18 = 4.5, 0.75 * 18 = 13.5, 0.25 * 30 = 7.5,
# 0.75 * 30 = 22.5) go down, where round-half-to-even would give 4, 14, 8, 22.
EXPECTED = {
    18: [1, 3, 4, 5, 7, 9, 10, 12, 13, 14, 16],
    28: [2, 5, 7, 8, 11, 14, 16, 19, 21, 22, 25],
    30: [3, 6, 7, 9, 12, 15, 18, 21, 22, 24, 27],
    32: [3, 6, 8, 9, 12, 16, 19, 22, 24, 25, 28],
    62: [6, 12, 15, 18, 24, 31, 37, 43, 46, 49, 55],
}


@pytest.mark.parametrize("depth", sorted(EXPECTED))
def test_fractions_floor_to_a_layer(depth):
    got = [resolve_layer(f, depth) for f in FRACTIONS]
    assert got == EXPECTED[depth]
    assert got == [math.floor(f * depth + 1e-9) for f in FRACTIONS]


def test_seed_example_and_probe_layers():
    # The preferences seed: Gemma-3-27B (62 layers) 0.5 -> L31, and its probes read layers
    # 31, 43 and 55, which are the extracted fractions 0.5, 0.7 and 0.9 under this rule.
    assert resolve_layers([0.5, 0.7, 0.9], 62) == [31, 43, 55]


def test_products_that_are_whole_in_decimal_stay_whole():
    # 0.29 * 100 is 28.999999999999996 in binary floating point; the written decimal is 29.
    assert resolve_layer(0.29, 100) == 29
    assert resolve_layer(0.7, 10) == 7


def test_integers_are_indices_and_negatives_count_from_the_end():
    assert resolve_layers([-1, 0, 3], 10) == [0, 3, 9]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layer(-10, 10) == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([1.0], r"fractional layer 1\.0 must lie strictly between 0 and 1"),
        ([0.0], r"fractional layer 0\.0"),
        ([2.0], r"fractional layer 2\.0"),
        ([-0.5], r"fractional layer -0\.5"),
        ([1.5], r"fractional layer 1\.5"),
        ([float("nan")], r"fractional layer nan"),
        ([float("inf")], r"fractional layer inf"),
        ([True], r"layer True is neither an integer index nor a fraction"),
        ([False], r"layer False"),
        (["3"], r"layer '3'"),
        ([None], r"layer None"),
        ([10], r"layer 10 out of range \(valid: -10 to 9 for 10 layers\)"),
        ([-11], r"layer -11 out of range"),
        ([], r"empty layer list"),
        ("some", r"unknown layer spec 'some'"),
        (True, r"layer True"),
    ],
)
def test_everything_else_is_refused_in_one_line(spec, message):
    with pytest.raises(LayerSpecError, match=message) as err:
        resolve_layers(spec, 10)
    assert "\n" not in str(err.value)


def test_the_form_is_checked_without_knowing_the_depth():
    check_layer_spec([0, -1, 0.5])
    check_layer_spec("all")
    for bad in ([1.0], [True], [], "middle"):
        with pytest.raises(LayerSpecError):
            check_layer_spec(bad)


@pytest.mark.parametrize(
    ("layers", "bad"), [([0, 1.0], r"1\.0"), ([True], "True"), ([0.0], r"0\.0")]
)
def test_params_refuse_a_malformed_spec_even_when_the_depth_is_unknown(layers, bad):
    from llmlab.params import ParamsError, parse_params

    raw = {
        # A hub entry without n_layers: the depth is unknown until the weights load.
        "model": "hub",
        "models": {"hub": {"source": "hub", "repo_id": "org/model", "revision": "0" * 40}},
        "foundation": {"layers": layers},
    }
    with pytest.raises(ParamsError, match=rf"foundation\.layers.*{bad}") as err:
        parse_params(raw)
    assert "\n" not in str(err.value)
