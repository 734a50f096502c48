"""Layer specs: integer indices (negatives count from the end) or fractions of depth.

Layer L means the residual stream after decoder block L (0-based), which equals
`output_hidden_states[L + 1]` for every layer but the last (where HF applies the final norm).

A spec has exactly one meaning:
- an integer is a layer index; a negative one counts from the end (-1 is the last layer);
- a float is a fraction of depth strictly between 0 and 1, resolved to layer
  floor(fraction * n_layers): for Gemma-3-27B (62 layers) 0.5 -> 31, 0.7 -> 43, 0.9 -> 55,
  the layers the preferences protocol probes;
- "all" is every layer.
Anything else (a bool, 0.0, 1.0, 2.0, a negative or non-finite float, an index out of range, an
empty list) is refused with a LayerSpecError naming the value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

LayerSpec = int | float | str | Sequence[int | float]


class LayerSpecError(ValueError):
    """A layer spec is malformed or cannot be resolved for the model's depth."""


def check_layer_value(spec: object) -> None:
    """Raise LayerSpecError unless `spec` is an int or a float strictly between 0 and 1."""
    if isinstance(spec, bool) or not isinstance(spec, int | float):
        raise LayerSpecError(f"layer {spec!r} is neither an integer index nor a fraction")
    if isinstance(spec, float) and not (math.isfinite(spec) and 0.0 < spec < 1.0):
        raise LayerSpecError(
            f"fractional layer {spec!r} must lie strictly between 0 and 1 "
            "(a layer index is written as an integer: 1, not 1.0)"
        )


def check_layer_spec(spec: object) -> None:
    """Raise LayerSpecError unless `spec` is 'all', one layer value or a non-empty list of them."""
    if isinstance(spec, str):
        if spec != "all":
            raise LayerSpecError(f"unknown layer spec {spec!r} (use 'all', integers or fractions)")
        return
    if isinstance(spec, Sequence):
        if not spec:
            raise LayerSpecError("empty layer list")
        for value in spec:
            check_layer_value(value)
        return
    check_layer_value(spec)


def fraction_to_layer(fraction: float, n_layers: int) -> int:
    """Return floor(fraction * n_layers), computed on the decimal the fraction was written as.

    Exact arithmetic on the written decimal keeps binary rounding from moving a product that
    is exactly an integer (0.29 * 100 is 28.999999999999996 in floats) to the layer below.
    """
    return math.floor(Fraction(repr(fraction)) * n_layers)


def resolve_layer(spec: int | float, n_layers: int) -> int:
    """Return the layer index for one spec: an int (negative counts from the end) or a fraction."""
    check_layer_value(spec)
    if isinstance(spec, float):
        return fraction_to_layer(spec, n_layers)
    if not -n_layers <= spec < n_layers:
        raise LayerSpecError(
            f"layer {spec} out of range (valid: {-n_layers} to {n_layers - 1} for {n_layers} layers)"
        )
    return spec % n_layers


def resolve_layers(spec: LayerSpec, n_layers: int) -> list[int]:
    """Return sorted unique layer indices for a spec: a list, one value, or 'all'."""
    check_layer_spec(spec)
    if isinstance(spec, str):
        return list(range(n_layers))
    values = list(spec) if isinstance(spec, Sequence) else [spec]
    return sorted({resolve_layer(v, n_layers) for v in values})
