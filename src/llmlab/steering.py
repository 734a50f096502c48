"""Activation steering: add `scale * vector` to the residual stream at chosen layers and positions.

One context manager serves forward passes, training and `generate`:
- `mask=None, prefill_only=False`: every token of every forward call is steered;
- `prefill_only=True`: only the forward call that processes the prompt (the one that fills
  the KV cache) is steered, later decode steps are not ("steer while the prompt fills the
  cache, then stop");
- `mask` [batch, seq]: only the marked positions of the prompt pass are steered, e.g. the
  context turn of a conversation whose question turn must stay unsteered. Because attention is
  causal, steering positions < t in one pass equals steering them while building a cache and
  then feeding the rest unsteered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from llmlab.hooks import forward_hooks, layer_output, replace_output


class SteeringError(ValueError):
    """A steering vector or mask does not fit the model or batch."""


def unit(vector: torch.Tensor) -> torch.Tensor:
    """Return the vector scaled to unit L2 norm (in fp32 for the norm)."""
    norm = vector.float().norm(dim=-1, keepdim=True)
    if torch.any(norm == 0):
        raise SteeringError("zero vector cannot be normalised")
    return (vector.float() / norm).to(vector.dtype)


@contextlib.contextmanager
def steer(
    layers: nn.ModuleList,
    layer_ids: Sequence[int],
    vectors: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
    prefill_only: bool = False,
) -> Iterator[None]:
    """Add scale * vectors to the outputs of the given layers while the context is open.

    vectors: [hidden] (same for every row) or [batch, hidden]; scale: a float or [batch].
    """
    hidden = vectors.shape[-1]
    if vectors.dim() not in (1, 2):
        raise SteeringError(
            f"vectors must be [hidden] or [batch, hidden], got {tuple(vectors.shape)}"
        )
    state = {"calls": 0}

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        h = layer_output(output)
        if h.shape[-1] != hidden:
            raise SteeringError(
                f"steering vector width {hidden} != model hidden size {h.shape[-1]}"
            )
        seq = h.shape[1]
        first_pass = state["calls"] == 0
        if prefill_only and not first_pass:
            return None
        # A mask describes the prompt pass; decode steps (other widths) are left alone. Not tied
        # to the call count, so recomputation under gradient checkpointing is steered too.
        if mask is not None and mask.shape[1] != seq:
            return None
        scl = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))
        vec = vectors.to(device=h.device, dtype=h.dtype)
        add = scl.to(device=h.device, dtype=h.dtype).reshape(-1, 1) * vec.reshape(-1, hidden)
        add = add.unsqueeze(1)  # [batch or 1, 1, hidden]
        if mask is not None:
            add = add * mask.to(device=h.device, dtype=h.dtype).unsqueeze(-1)
        return replace_output(output, h + add)

    def counting(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        state["calls"] += 1

    hooks = {i: hook for i in layer_ids}
    last = max(layer_ids)
    with forward_hooks(layers, hooks):
        # Count calls on the deepest steered layer, registered after the steering hook so the
        # first pass is complete before later passes are told apart from it.
        handle = layers[last].register_forward_hook(counting)
        try:
            yield
        finally:
            handle.remove()
