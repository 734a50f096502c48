"""Layer specs: integers, negative indices or fractions of depth, resolved to layer indices.

Layer L means the residual stream after decoder block L (0-based), which equals
`output_hidden_states[L + 1]` for every layer but the last (where HF applies the final norm).
"""

from __future__ import annotations

from collections.abc import Sequence

LayerSpec = int | float | str | Sequence[int | float]


class LayerSpecError(ValueError):
    """A layer spec cannot be resolved for the model's depth."""


def resolve_layer(spec: int | float, n_layers: int) -> int:
    """Return the layer index for one spec: int (negative counts from the end) or 0 < fraction < 1."""
    if isinstance(spec, bool):
        raise LayerSpecError(f"layer {spec!r} is not a number")
    if isinstance(spec, float) and not spec.is_integer():
        if not 0.0 < spec < 1.0:
            raise LayerSpecError(f"fractional layer {spec} must lie in (0, 1)")
        return min(n_layers - 1, max(0, round(spec * n_layers)))
    idx = int(spec)
    if not -n_layers <= idx < n_layers:
        raise LayerSpecError(f"layer {idx} out of range")
    return idx % n_layers


def resolve_layers(spec: LayerSpec, n_layers: int) -> list[int]:
    """Return sorted unique layer indices for a spec: a list, one value, or 'all'."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(n_layers))
        raise LayerSpecError(f"unknown layer spec {spec!r} (use 'all', ints or fractions)")
    values = [spec] if isinstance(spec, int | float) else list(spec)
    if not values:
        raise LayerSpecError("empty layer list")
    return sorted({resolve_layer(v, n_layers) for v in values})
