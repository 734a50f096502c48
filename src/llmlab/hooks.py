"""Forward hooks on decoder layers, always removed when their context ends."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the last needed layer has run."""


def layer_output(output: Any) -> torch.Tensor:
    """Return the hidden-state tensor of a decoder layer's output (tensor or tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_output(output: Any, hidden: torch.Tensor) -> Any:
    """Return the layer output with its hidden state replaced, keeping the original shape."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


@contextlib.contextmanager
def forward_hooks(
    layers: nn.ModuleList, hooks: dict[int, Callable[[nn.Module, Any, Any], Any]]
) -> Iterator[None]:
    """Register forward hooks on the given layer indices; removed on exit, also on error."""
    handles = []
    try:
        for idx, fn in hooks.items():
            handles.append(layers[idx].register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record_layers(
    layers: nn.ModuleList, indices: Sequence[int], stop_after_last: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Yield a dict filled with each listed layer's output during the forward pass.

    With stop_after_last, the forward pass ends (StopForward, caught here) right after the
    deepest listed layer, so layers above it and the LM head never run.
    """
    store: dict[int, torch.Tensor] = {}
    last = max(indices)

    def make(idx: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            store[idx] = layer_output(output)
            if stop_after_last and idx == last:
                raise StopForward

        return hook

    with forward_hooks(layers, {i: make(i) for i in indices}):
        try:
            yield store
        except StopForward:
            pass
