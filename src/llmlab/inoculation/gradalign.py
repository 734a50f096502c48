"""Per-example loss and residual-gradient alignment with the trait direction, in batches.

Used by stage 3 (every condition on the calibration batch) and by the finetune stage's eval
hook (alignment logged during training). Gradients come from `llmlab.gradients` with the
parameters frozen; cosines are fp32 (`llmlab.gradients.alignment`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmlab.chat import ChatError, EncodedChat, Message, collate, encode_chat, length_sorted_batches
from llmlab.gradients import alignment, residual_gradients
from llmlab.models import LoadedModel


def encode_targets(
    loaded: LoadedModel,
    conversations: Sequence[Sequence[Message]],
    ids: Sequence[str],
    positions: Sequence[str],
    max_target_tokens: int | None,
    what: str,
) -> list[EncodedChat]:
    """Return encoded conversations, targets cut to max_target_tokens, all positions present.

    A conversation lacking a position (no user text, an assistant turn shorter than k tokens)
    raises ChatError naming the item, so no example is silently scored at a wrong token.
    """
    out: list[EncodedChat] = []
    for item_id, conv in zip(ids, conversations, strict=True):
        try:
            enc = encode_chat(loaded.tokenizer, conv, chat=loaded.chat)
        except ChatError as e:
            raise ChatError(f"{what} {item_id!r}: {e}") from None
        if conv[-1]["role"] != "assistant":
            raise ChatError(f"{what} {item_id!r}: no assistant target to score")
        if max_target_tokens is not None and enc.assistant_len > max_target_tokens:
            enc = EncodedChat(
                enc.input_ids[: enc.prompt_len + max_target_tokens], enc.prompt_len, enc.user_end
            )
        for pos in positions:
            try:
                enc.position(pos)
            except ChatError as e:
                raise ChatError(
                    f"{what} {item_id!r} lacks a position the template needs: {e}"
                ) from None
        out.append(enc)
    return out


@dataclass
class AlignmentResult:
    """Per-example numbers: loss [N], tokens [N], dot/grad_norm/cos [N, L, P], grads [N, L, d]."""

    loss: np.ndarray
    n_tokens: np.ndarray
    dot: np.ndarray
    grad_norm: np.ndarray
    cos: np.ndarray
    grads: np.ndarray | None


def measure_alignment(
    loaded: LoadedModel,
    encoded: Sequence[EncodedChat],
    layers: Sequence[int],
    positions: Sequence[str],
    directions: np.ndarray,
    batch_size: int,
    keep_grads_at: str | None = None,
) -> AlignmentResult:
    """Return loss and <g, v>, |g|, cos(g, v) per example, layer and position (rows in input order).

    cos is NaN where the gradient is exactly zero.

    directions: [len(layers), hidden] unit vectors, row i for layers[i]. keep_grads_at names a
    position whose raw gradients are returned too (for the random-direction control).
    """
    n, n_l, n_p = len(encoded), len(layers), len(positions)
    if directions.shape[0] != n_l:
        raise ValueError(f"{directions.shape[0]} directions for {n_l} layers")
    hidden = directions.shape[1]
    loss = np.zeros(n, dtype=np.float64)
    n_tok = np.zeros(n, dtype=np.int64)
    dot = np.zeros((n, n_l, n_p), dtype=np.float32)
    norm = np.zeros_like(dot)
    cos = np.zeros_like(dot)
    grads = np.zeros((n, n_l, hidden), dtype=np.float32) if keep_grads_at else None
    vecs = torch.from_numpy(np.ascontiguousarray(directions, dtype=np.float32))
    pad = loaded.tokenizer.pad_token_id
    lengths = [len(e.input_ids) for e in encoded]
    for rows in length_sorted_batches(lengths, batch_size):
        batch = collate([encoded[i] for i in rows], pad, padding_side="right")
        res = residual_gradients(loaded, batch, list(layers), list(positions))
        loss[rows] = res.loss.cpu().numpy()
        n_tok[rows] = res.n_loss_tokens.cpu().numpy()
        for li, layer in enumerate(layers):
            for pi, pos in enumerate(positions):
                g = res.grads[(layer, pos)]
                a = alignment(g, vecs[li])
                dot[rows, li, pi] = a.dot.cpu().numpy()
                norm[rows, li, pi] = a.grad_norm.cpu().numpy()
                cos[rows, li, pi] = a.cos.cpu().numpy()
                if grads is not None and pos == keep_grads_at:
                    grads[rows, li] = g.cpu().numpy()
    # A structurally zero gradient (e.g. user_end at the last layer, whose logits predict a
    # prompt token) has no direction: its cosine is undefined, not 0.
    cos[norm == 0] = np.nan
    return AlignmentResult(loss, n_tok, dot, norm, cos, grads)
