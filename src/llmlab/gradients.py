"""Gradients of the loss with respect to the residual stream, with parameters frozen.

One backward pass of the batch's summed per-example loss gives every example's gradient: the
examples of a batch do not interact, so d(sum_i L_i)/dh_i = dL_i/dh_i. The shallowest requested
layer's output is detached and made a leaf, so the graph (and its memory) starts there.
Cosines with a direction are computed in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.activations import attention_mask_for
from llmlab.chat import ChatBatch
from llmlab.hooks import forward_hooks, layer_output, replace_output
from llmlab.models import LoadedModel


@dataclass
class GradientResult:
    """Per-example losses and residual gradients at (layer, position), fp32 [batch, hidden]."""

    loss: torch.Tensor
    grads: dict[tuple[int, str], torch.Tensor]
    n_loss_tokens: torch.Tensor


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Turn off requires_grad on every parameter for the block, restoring it afterwards."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def per_example_loss(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (mean next-token loss per row over labelled tokens, labelled-token count per row)."""
    return _loss_at(logits[:, :-1], labels[:, 1:])


def _loss_at(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Upcast low-precision logits for the softmax; float64 models stay float64.
    flat = logits.to(torch.promote_types(logits.dtype, torch.float32))
    tok = F.cross_entropy(
        flat.reshape(-1, flat.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    count = (targets != -100).sum(dim=1)
    return tok.sum(dim=1) / count.clamp(min=1), count


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Return the sequence indices whose logits predict a labelled token in any row."""
    return (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()


def residual_gradients(
    loaded: LoadedModel,
    batch: ChatBatch,
    layers: Sequence[int],
    positions: Sequence[str],
) -> GradientResult:
    """Return per-example loss and dL/dh at each (layer, position) for one batch."""
    layers = sorted(set(layers))
    first = layers[0]
    store: dict[int, torch.Tensor] = {}

    def make(idx: int) -> Any:
        def hook(_m: nn.Module, _i: Any, output: Any) -> Any:
            h = layer_output(output)
            if idx == first:
                h = h.detach().requires_grad_(True)
                store[idx] = h
                return replace_output(output, h)
            store[idx] = h
            return None

        return hook

    model = loaded.model
    was_training = model.training
    model.eval()
    # Right-padded batches run without the padding mask (causal attention gives the same
    # values at every real token, on the fused kernels); see attention_mask_for.
    needs_mask = attention_mask_for(batch.attention_mask) is not None
    # Only the logits that predict assistant tokens are computed: with a 128k vocabulary
    # the full [batch, seq, vocab] logits would dominate memory. The positions and the
    # empty-row check are read from the labels before they move, so the host never waits
    # for the device (the previous batch's backward) here.
    keep = scored_positions(batch.labels)
    if bool(((batch.labels[:, 1:] != -100).sum(dim=1) == 0).any()):
        raise ValueError("gradient batch has a row without assistant tokens to score")
    batch = batch.to(loaded.device)
    keep = keep.to(loaded.device)
    try:
        with (
            frozen(model),
            forward_hooks(loaded.layers, {i: make(i) for i in layers}),
            torch.enable_grad(),
        ):
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask if needs_mask else None,
                use_cache=False,
                logits_to_keep=keep,
            )
            loss, count = _loss_at(out.logits, batch.labels[:, keep + 1])
            grads = torch.autograd.grad(loss.sum(), [store[i] for i in layers])
    finally:
        model.train(was_training)
    rows = torch.arange(batch.input_ids.shape[0], device=loaded.device)
    result: dict[tuple[int, str], torch.Tensor] = {}
    for pos in positions:
        idx = batch.positions(pos).to(loaded.device)
        for layer, g in zip(layers, grads, strict=True):
            result[(layer, pos)] = g[rows, idx].float()
    return GradientResult(loss.detach().float(), result, count)


@dataclass
class Alignment:
    """Inner product, gradient norm and cosine of gradients with a direction (fp32)."""

    dot: torch.Tensor
    grad_norm: torch.Tensor
    cos: torch.Tensor


def alignment(grads: torch.Tensor, direction: torch.Tensor) -> Alignment:
    """Return <g, v>, |g| and cos(g, v) per row of grads [batch, hidden], all in fp32."""
    g = grads.float()
    v = direction.float().to(g.device)
    if v.shape[-1] != g.shape[-1]:
        raise ValueError(f"direction width {v.shape[-1]} != gradient width {g.shape[-1]}")
    dot = g @ v
    gn = g.norm(dim=-1)
    cos = dot / (gn * v.norm()).clamp(min=torch.finfo(torch.float32).tiny)
    return Alignment(dot, gn, cos)
