"""LoRA finetuning on chat data, with optional activation steering during training.

Every family trains through `train_lora`: peft LoRA on the transformers `Trainer`, loss on the
assistant tokens only (labels are -100 on the prompt and on padding), validation loss and a
family hook every `eval_every` steps, a NaN / divergence guard, and an output directory that
appears by rename only when complete (adapter safetensors, `llmlab_adapter.json`, `curve.json`).

By default (`packing`) each micro-batch's examples, taken in random order, are packed into rows
of at most max_length tokens with per-example position ids (attention stays within each
example) and the loss runs on the labelled positions only, in chunks (PackedCollator,
labelled_nll): no compute on padding and no full-vocabulary fp32 logits, so large micro-batches
fit without gradient checkpointing. Each example's loss equals the padded path's within
floating-point noise. The share of each data group (TrainExample.group) in every optimizer step
is recorded as `batch_mix` in the adapter metadata. For the fastest GPU runs, also compile the
norms and MLP first (`llmlab.fused.compile_elementwise`; benchmarks/RESULTS.md).

Every `save_every` optimizer steps a resumable checkpoint (adapter safetensors, optimizer,
scheduler, RNG states, trainer state and the curve / guard state) goes to
`<out_dir>.partial/checkpoint-<step>`; only the newest complete one is kept. A re-run with the
same config, data and base model resumes from it and ends with the adapter and curve an
uninterrupted run gives (up to floating-point noise): the data order of every epoch comes
from (seed, epoch) alone, and the Trainer restores RNG, optimizer, scheduler and data position.
A re-run with anything else changed starts fresh and says so. The `.partial` directory is
removed once the adapter is in place. The fingerprint and the work directory are
`llmlab.training_resume`; writing the finished adapter directory is `llmlab.training_output`.

Steered examples carry a vector that is added (times a magnitude) to the residual stream at
their layers, on a caller-given token span, during the training forward pass: the adapter
learns to behave as it should *given* that perturbation (e.g. reporting an injected concept).

Multi-GPU runs go through `accelerate launch`; the Trainer does the distributed work. Only the
main process evaluates and writes the output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmlab.adapters import check_target_modules
from llmlab.chat import EncodedChat, Message, collate, encode_chat, length_sorted_batches
from llmlab.config_base import LoraTrainConfig
from llmlab.io import atomic_path
from llmlab.live import live_callback
from llmlab.models import LoadedModel, decoder_layers, unwrap
from llmlab.steering import steer
from llmlab.training_output import CURVE_FILE as CURVE_FILE
from llmlab.training_output import write_output
from llmlab.training_resume import (
    CHECKPOINT_PREFIX,
    MONITOR_FILE,
    checkpoint_step,
    discard,
    examples_sha256,
    is_main_process,
    library_versions,
    prepare_work_dir,
    resume_fingerprint,
    wait_for_everyone,
    world_size,
)
from llmlab.training_resume import latest_checkpoint as latest_checkpoint
from llmlab.training_resume import partial_dir as partial_dir

log = logging.getLogger(__name__)

CURVE_KEYS = ("step", "loss", "lr", "grad_norm", "val_loss")
RESERVED_METADATA = (
    "base_model",
    "config",
    "data_sha256",
    "val_sha256",
    "n_examples",
    "n_val",
    "n_truncated",
    "n_dropped",
    "final_train_loss",
    "final_val_loss",
    "steps",
    "tokens_seen",
    "gradient_accumulation_steps",
    "world_size",
    "train_time_s",
    "tokens_per_s",
    "versions",
    "wall_time_s",
    "resumed_from_step",
    "batch_mix",
)
EvalHook = Callable[[Any, int], dict[str, float]]


class TrainingError(ValueError):
    """The training config or data cannot be used; the message names the field or example."""


class TrainingDiverged(RuntimeError):
    """Training stopped because the loss became NaN/inf or grew far above its initial value."""


def gradient_accumulation_steps(cfg: LoraTrainConfig, world_size: int = 1) -> int:
    """Return effective / (per_device x world size); TrainingError when it does not divide."""
    per_step = cfg.per_device_batch_size * world_size
    if cfg.effective_batch_size % per_step:
        raise TrainingError(
            f"effective_batch_size {cfg.effective_batch_size} is not divisible by "
            f"per_device_batch_size {cfg.per_device_batch_size} x {world_size} process(es)"
        )
    return cfg.effective_batch_size // per_step


@dataclass(frozen=True)
class SteerSpec:
    """Steering for one training example: add magnitude * vector at `layers` on a token span.

    span: (start, end) token indices into the encoded conversation (end exclusive), computed
    by the caller, e.g. the context turn; None steers every token. Normalise the vector first
    when the magnitude should be in units of residual norm.
    """

    vector: torch.Tensor
    magnitude: float
    layers: tuple[int, ...]
    span: tuple[int, int] | None = None


@dataclass(frozen=True)
class TrainExample:
    """One conversation whose last message (role assistant) is the training target."""

    messages: list[Message]
    steer: SteerSpec | None = None
    # Train on the first k assistant tokens only (e.g. a one-token label); the rest of the
    # sequence is cut, which under causal attention leaves those k tokens' loss unchanged.
    loss_tokens: int | None = None
    # The first n tokens carry no gradient, as if they had filled a KV cache under no_grad
    # before the rest was read with gradient (the outputs of every LoRA module there are
    # detached; the forward values are unchanged). Must not reach the labelled tokens.
    no_grad_prefix: int | None = None
    # Forced-choice loss: only the last kept token is labelled, and it is scored against these
    # token ids alone (softmax over them, not the vocabulary), e.g. yes vs no after an answer
    # prefix. Requires loss_tokens; the labelled token must be one of the ids.
    loss_choices: tuple[int, ...] | None = None
    # Data-mix group (e.g. "poison" / "aligned"): the share of each group in every optimizer
    # step is recorded in the adapter metadata (batch_mix), since the batch composition is
    # part of a data-mixing experiment.
    group: str | None = None


@dataclass
class TrainResult:
    """Where the adapter was written, the training curve and the final numbers."""

    adapter_dir: Path
    curve: list[dict[str, Any]]
    final_train_loss: float | None
    final_val_loss: float | None
    tokens_per_s: float
    steps: int
    tokens_seen: int
    model: Any = field(repr=False, default=None)


# ---- data ------------------------------------------------------------------------------------


# A feature is a plain dict
# {"input_ids": list[int], "prompt_len": int, "steer": SteerSpec | None, "group": str | None}:
# the Trainer's length-grouped sampler reads lengths from dataset[i]["input_ids"] of mappings.
Feature = dict[str, Any]


@dataclass
class PreparedData:
    """Encoded features of a data set with the truncation counts."""

    features: list[Feature]
    n_truncated: int
    n_dropped: int


def prepare_examples(
    loaded: LoadedModel, examples: Sequence[TrainExample], max_length: int, what: str = "train"
) -> PreparedData:
    """Return encoded, truncated features; examples left with no assistant token are dropped."""
    features: list[Feature] = []
    n_truncated = n_dropped = 0
    for i, ex in enumerate(examples):
        if not ex.messages or ex.messages[-1].get("role") != "assistant":
            raise TrainingError(f"{what} example {i}: the last message must be the assistant's")
        enc = encode_chat(loaded.tokenizer, ex.messages, chat=loaded.chat)
        ids = enc.input_ids
        if ex.loss_tokens is not None:
            if ex.loss_tokens < 1:
                raise TrainingError(f"{what} example {i}: loss_tokens must be >= 1")
            ids = ids[: enc.prompt_len + ex.loss_tokens]
        if len(ids) > max_length:
            n_truncated += 1
            ids = ids[:max_length]
        if enc.prompt_len >= len(ids):
            n_dropped += 1
            continue
        spec = _check_steer(ex.steer, loaded, i, what)
        feature: Feature = {
            "input_ids": list(ids),
            "prompt_len": enc.prompt_len,
            "steer": spec,
            "group": ex.group,
        }
        if ex.no_grad_prefix is not None:
            if not 0 < ex.no_grad_prefix <= enc.prompt_len:
                raise TrainingError(
                    f"{what} example {i}: no_grad_prefix {ex.no_grad_prefix} must be in "
                    f"1..{enc.prompt_len} (the prompt)"
                )
            feature["no_grad_prefix"] = ex.no_grad_prefix
        if ex.loss_choices is not None:
            if ex.loss_tokens is None or not ex.loss_choices:
                raise TrainingError(
                    f"{what} example {i}: loss_choices needs loss_tokens and at least one id"
                )
            if ids[-1] not in ex.loss_choices:
                raise TrainingError(
                    f"{what} example {i}: labelled token {ids[-1]} is not among "
                    f"loss_choices {list(ex.loss_choices)}"
                )
            # Only the last kept token carries the (forced-choice) loss.
            feature["prompt_len"] = len(ids) - 1
            feature["choices"] = list(ex.loss_choices)
        features.append(feature)
    if n_dropped:
        log.warning(
            "%s: %d example(s) dropped: their prompt fills max_length=%d",
            what,
            n_dropped,
            max_length,
        )
    if not features:
        raise TrainingError(
            f"{what}: no example has assistant tokens within max_length={max_length}"
        )
    return PreparedData(features, n_truncated, n_dropped)


def _check_steer(
    spec: SteerSpec | None, loaded: LoadedModel, i: int, what: str
) -> SteerSpec | None:
    """Return the validated spec with a CPU fp32 vector and sorted layers (None passes)."""
    if spec is None:
        return None
    where = f"{what} example {i}: steer"
    if spec.vector.dim() != 1 or spec.vector.shape[0] != loaded.hidden_size:
        raise TrainingError(
            f"{where}.vector must be [{loaded.hidden_size}], got {tuple(spec.vector.shape)}"
        )
    if not spec.layers or any(not 0 <= n < loaded.n_layers for n in spec.layers):
        raise TrainingError(f"{where}.layers {spec.layers} out of range 0..{loaded.n_layers - 1}")
    if spec.span is not None and not 0 <= spec.span[0] < spec.span[1]:
        raise TrainingError(f"{where}.span {spec.span} must satisfy 0 <= start < end")
    return SteerSpec(
        spec.vector.detach().float().cpu(),
        float(spec.magnitude),
        tuple(sorted(set(spec.layers))),
        spec.span,
    )


def _choice_tensor(choices: Sequence[list[int] | None]) -> torch.Tensor:
    """Return forced-choice ids [n, n_choices]; TrainingError when the examples disagree."""
    first = choices[0]
    if first is None or any(c is None or len(c) != len(first) for c in choices):
        raise TrainingError(
            "forced-choice examples must all have the same number of loss_choices and cannot "
            "be mixed with full-vocabulary examples"
        )
    return torch.tensor(choices)


class LoraCollator:
    """Collate features into right-padded input_ids / attention_mask / labels (+ steering).

    Labels come from chat.collate: -100 on the prompt and on padding. When any row is
    steered, `steer` holds one group per distinct layer set, each with per-row vectors
    [batch, hidden], magnitudes [batch] (0 for rows outside the group) and a [batch, seq] mask.
    """

    def __init__(self, pad_token_id: int, hidden_size: int) -> None:
        self.pad_token_id = pad_token_id
        self.hidden_size = hidden_size

    def __call__(self, features: Sequence[Feature]) -> dict[str, Any]:
        """Return the batch dict the Trainer feeds to compute_loss."""
        encoded = [EncodedChat(f["input_ids"], f["prompt_len"], None) for f in features]
        batch = collate(encoded, self.pad_token_id, padding_side="right")
        out: dict[str, Any] = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "labels": batch.labels,
        }
        choices = [f.get("choices") for f in features]
        if any(c is not None for c in choices):
            out["choice_ids"] = _choice_tensor(choices)
        if any(f.get("no_grad_prefix") for f in features):
            mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
            for row, f in enumerate(features):
                mask[row, : f.get("no_grad_prefix") or 0] = True  # right padding: column = index
            out["no_grad_mask"] = mask
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, f in enumerate(features):
            if f["steer"] is not None:
                groups.setdefault(f["steer"].layers, []).append(row)
        if groups:
            out["steer"] = [
                self._group(layers, rows, features, batch.input_ids.shape[1])
                for layers, rows in sorted(groups.items())
            ]
        return out

    def _group(
        self, layers: tuple[int, ...], rows: list[int], features: Sequence[Feature], width: int
    ) -> dict[str, torch.Tensor]:
        n = len(features)
        vectors = torch.zeros(n, self.hidden_size)
        scale = torch.zeros(n)
        mask = torch.zeros(n, width)
        for row in rows:
            spec = features[row]["steer"]
            length = len(features[row]["input_ids"])
            start, end = spec.span if spec.span is not None else (0, length)
            vectors[row] = spec.vector
            scale[row] = spec.magnitude
            # Right padding: token index i of the encoded row is column i.
            mask[row, min(start, length) : min(end, length)] = 1.0
        return {"layers": torch.tensor(layers), "vectors": vectors, "scale": scale, "mask": mask}


class PackedCollator:
    """Collate features into packed rows: several examples per row, no padding compute.

    Examples are placed first-fit (longest first) into rows of at most `row_tokens` tokens;
    each example's position ids restart at 0, which the model's mask builder reads as a
    sequence boundary (transformers `find_packed_sequence_indices`), so attention stays
    within each example and every example sees exactly the positions it has alone. The tail
    of a row shorter than the longest is filler with its own positions and label -100.
    There is no attention_mask: with one, transformers would not look for packed sequences.

    Labels are -100 on prompts, on filler and on each example's first token, so the shifted
    next-token loss never crosses from one example into the next. Steering: per layer set,
    the k-th steered example of every row forms slot k, one steer() context with per-row
    vectors [rows, hidden], magnitudes [rows] and a per-token mask [rows, width] that marks
    only that example's span (so several differently steered examples share a row).
    """

    def __init__(self, pad_token_id: int, hidden_size: int, row_tokens: int) -> None:
        self.pad_token_id = pad_token_id
        self.hidden_size = hidden_size
        self.row_tokens = row_tokens

    def pack(self, lengths: Sequence[int]) -> list[list[int]]:
        """Return the feature indices of each row (first-fit decreasing under row_tokens)."""
        rows: list[list[int]] = []
        free: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            slot = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
            if slot is None:
                rows.append([i])
                free.append(max(self.row_tokens, lengths[i]) - lengths[i])
            else:
                rows[slot].append(i)
                free[slot] -= lengths[i]
        return rows

    def __call__(self, features: Sequence[Feature]) -> dict[str, Any]:
        """Return the batch dict the Trainer feeds to compute_loss."""
        lengths = [len(f["input_ids"]) for f in features]
        rows = self.pack(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        # (layers, slot) -> [(row, feature index, offset)]
        slots: dict[tuple[tuple[int, ...], int], list[tuple[int, int, int]]] = {}
        # Forced-choice ids per labelled position, in the row-major order of the labels.
        choices: list[list[int] | None] = []
        no_grad = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, row in enumerate(rows):
            offset = 0
            per_layers: dict[tuple[int, ...], int] = {}
            for i in row:
                f, n = features[i], lengths[i]
                ids[r, offset : offset + n] = torch.tensor(f["input_ids"])
                positions[r, offset : offset + n] = torch.arange(n)
                start = max(f["prompt_len"], 1)
                labels[r, offset + start : offset + n] = ids[r, offset + start : offset + n]
                choices.extend([f.get("choices")] * (n - start))
                no_grad[r, offset : offset + (f.get("no_grad_prefix") or 0)] = True
                if f["steer"] is not None:
                    key = f["steer"].layers
                    k = per_layers.get(key, 0)
                    per_layers[key] = k + 1
                    slots.setdefault((key, k), []).append((r, i, offset))
                offset += n
            positions[r, offset:] = torch.arange(width - offset)
        out: dict[str, Any] = {
            "input_ids": ids,
            "position_ids": positions,
            "labels": labels,
            "num_tokens": sum(lengths),
        }
        if any(c is not None for c in choices):
            out["choice_ids"] = _choice_tensor(choices)
        if bool(no_grad.any()):
            out["no_grad_mask"] = no_grad
        if slots:
            out["steer"] = [
                self._slot(layers, members, features, len(rows), width)
                for (layers, _k), members in sorted(slots.items())
            ]
        return out

    def _slot(
        self,
        layers: tuple[int, ...],
        members: list[tuple[int, int, int]],
        features: Sequence[Feature],
        n_rows: int,
        width: int,
    ) -> dict[str, torch.Tensor]:
        vectors = torch.zeros(n_rows, self.hidden_size)
        scale = torch.zeros(n_rows)
        mask = torch.zeros(n_rows, width)
        for r, i, offset in members:
            spec = features[i]["steer"]
            length = len(features[i]["input_ids"])
            start, end = spec.span if spec.span is not None else (0, length)
            vectors[r] = spec.vector
            scale[r] = spec.magnitude
            mask[r, offset + min(start, length) : offset + min(end, length)] = 1.0
        return {"layers": torch.tensor(layers), "vectors": vectors, "scale": scale, "mask": mask}


# Rows of hidden states per cross-entropy chunk: a chunk's fp32 logits are
# LOSS_CHUNK x vocab x 4 bytes (2 GiB at a 128k vocabulary).
LOSS_CHUNK = 4096


def labelled_nll(
    model: Any,
    batch: dict[str, Any],
    per_token: bool = False,
    choice_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the summed next-token NLL over the labelled positions of a (packed) batch.

    The LM head never runs on the whole sequence: a pre-hook takes its input (the final
    hidden states, after the model's own forward, so DDP and hooks see a normal call) and
    hands it an empty slice; the labelled positions then go through the head in chunks of
    LOSS_CHUNK rows, each under activation checkpointing, so neither the full logits nor one
    chunk's fp32 logits per chunk are kept for the backward pass (the chunk is recomputed).
    Hand-written because transformers computes the loss from full-sequence logits; the
    fused linear cross-entropy kernels that avoid them (e.g. Liger's) are not dependencies.
    per_token: return the NLL of every labelled position instead (in label order).
    Logit soft-capping (Gemma 2) is applied as the model would. choice_ids [n_labelled,
    n_choices]: score each labelled token against its choices only (forced choice).
    """
    base = unwrap(model)
    head = base.get_output_embeddings()
    cap = getattr(getattr(base, "config", None), "final_logit_softcapping", None)
    captured: list[torch.Tensor] = []

    def take_hidden(_module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        captured.append(args[0])
        return (args[0][:, :0], *args[1:])

    handle = head.register_forward_pre_hook(take_hidden)
    try:
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    finally:
        handle.remove()
    hidden = captured[0][:, :-1]
    labels = batch["labels"][:, 1:].to(hidden.device)
    keep = labels != -100
    hidden, targets = hidden[keep], labels[keep]

    if choice_ids is not None:
        choice_ids = choice_ids.to(hidden.device)
        if choice_ids.shape[0] != targets.shape[0]:
            raise TrainingError(
                f"{choice_ids.shape[0]} forced-choice rows for {targets.shape[0]} labelled tokens"
            )

    def nll(h: torch.Tensor, y: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        logits = head(h).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        if c is not None:
            logits = logits.gather(1, c)
            y = (c == y.unsqueeze(1)).float().argmax(dim=1)
        return F.cross_entropy(logits, y, reduction="none" if per_token else "sum")

    parts = []
    for k in range(0, targets.shape[0], LOSS_CHUNK):
        h, y = hidden[k : k + LOSS_CHUNK], targets[k : k + LOSS_CHUNK]
        c = choice_ids[k : k + LOSS_CHUNK] if choice_ids is not None else None
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(nll, h, y, c, use_reentrant=False))
        else:
            parts.append(nll(h, y, c))
    if per_token:
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return torch.stack(parts).sum() if parts else hidden.new_zeros((), dtype=torch.float32)


def forced_choice_nll(
    logits: torch.Tensor, labels: torch.Tensor, choice_ids: torch.Tensor
) -> torch.Tensor:
    """Return the summed NLL of each row's one labelled token among its choice ids.

    logits [batch, seq, vocab], labels [batch, seq] (-100 except the one labelled token per
    row), choice_ids [batch, n_choices]. Cross-entropy over the choice logits only, so the
    model is pushed between the choices and not towards them against the rest of the
    vocabulary.
    """
    targets = labels[:, 1:]
    keep = targets != -100
    if not torch.equal(keep.sum(dim=1), torch.ones_like(keep.sum(dim=1))):
        raise TrainingError("forced-choice rows must have exactly one labelled token each")
    pos = keep.float().argmax(dim=1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    at = logits[rows, pos.to(logits.device)].float()  # [batch, vocab]
    ids = choice_ids.to(logits.device)
    choice_logits = at.gather(1, ids)
    label = targets[rows.cpu(), pos.cpu()].to(logits.device)
    target = (ids == label.unsqueeze(1)).float().argmax(dim=1)
    return F.cross_entropy(choice_logits, target, reduction="sum")


@contextlib.contextmanager
def no_grad_positions(model: Any, mask: torch.Tensor | None) -> Iterator[None]:
    """Detach the outputs of every LoRA module at the masked positions while the block runs.

    Frozen base weights carry no gradient, so this stops all gradient through those positions:
    when they are a prefix, the result equals filling a KV cache with them under no_grad (LoRA
    active) and reading the rest with gradient, in one pass. None: nothing is hooked.
    """
    if mask is None:
        yield
        return
    keep = mask.to(next(model.parameters()).device).unsqueeze(-1)

    def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 3 or output.shape[:2] != keep.shape[:2]:
            raise TrainingError(
                f"no_grad_mask {tuple(keep.shape[:2])} does not fit a LoRA output "
                f"{tuple(output.shape)}"
            )
        return torch.where(keep, output.detach(), output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if hasattr(m, "lora_A")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def steering_groups(layers: torch.nn.ModuleList, groups: Sequence[dict] | None) -> Iterator[None]:
    """Open one steering context per layer group of a collated batch (none when unsteered)."""
    with contextlib.ExitStack() as stack:
        for g in groups or ():
            stack.enter_context(
                steer(layers, g["layers"].tolist(), g["vectors"], g["scale"], g["mask"])
            )
        yield


def assistant_nll(
    model: Any,
    features: Sequence[Feature],
    collator: LoraCollator,
    batch_size: int,
) -> float:
    """Return the mean NLL over all assistant tokens of the features (steering applied)."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    lengths = [len(f["input_ids"]) for f in features]
    with torch.no_grad():
        for idx in length_sorted_batches(lengths, batch_size):
            batch = collator([features[i] for i in idx])
            groups = [{k: v.to(device) for k, v in g.items()} for g in batch.get("steer", [])]
            with steering_groups(layers, groups):
                logits = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                ).logits
            labels = batch["labels"][:, 1:].to(device)
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(nll)
            count += int((labels != -100).sum())
    return total / max(count, 1)


# ---- trainer pieces --------------------------------------------------------------------------


# transformers and peft are imported inside functions: stage modules import this one at the
# top, and a stage that fails on its params or inputs must not pay for those imports first.


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """Training order that depends on (seed, epoch) only, never on the global RNG state.

    The Trainer's own samplers draw from the global torch RNG when an epoch's iterator is made,
    so after a resume the resumed epoch's order would differ from an uninterrupted run's (the
    global RNG is in another state at that instant: restored later, touched by evaluation).
    This sampler is reseeded from (seed, epoch) through `set_epoch`, which the Trainer (via
    accelerate's data loader) calls before every epoch, resumed ones included. With
    group_by_length it groups as the Trainer's LengthGroupedSampler does (length-sorted
    mega-batches of 50 batches, the longest batch first).
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        digest = hashlib.sha256(f"llmlab-data-order:{self.seed}:{self.epoch}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        if self.group_by_length:
            from transformers.trainer_pt_utils import get_length_grouped_indices

            order = get_length_grouped_indices(self.lengths, self.batch_size, generator=gen)
            return iter([int(i) for i in order])
        return iter(torch.randperm(len(self.lengths), generator=gen).tolist())


def batch_mix(
    features: Sequence[Feature], cfg: LoraTrainConfig, grad_accum: int, steps: int
) -> dict[str, Any] | None:
    """Return each data group's share of the examples of every optimizer step (min/median/max).

    The steps are rebuilt from the training order, which depends on (seed, epoch) only (see
    EpochSeededSampler): step k of an epoch holds examples [k*E, (k+1)*E) of that epoch's
    order, E the effective batch size. None when no example carries a group.
    """
    groups = [f.get("group") for f in features]
    names = sorted({g for g in groups if g is not None})
    if not names or steps < 1:
        return None
    lengths = [len(f["input_ids"]) for f in features]
    sampler = EpochSeededSampler(
        lengths,
        cfg.per_device_batch_size * grad_accum,
        cfg.seed,
        cfg.group_by_length and not cfg.packing,
    )
    size = cfg.effective_batch_size
    shares: dict[str, list[float]] = {g: [] for g in names}
    epoch = 0
    while len(shares[names[0]]) < steps:
        sampler.set_epoch(epoch)
        order = list(sampler)
        for k in range(0, len(order), size):
            members = [groups[i] for i in order[k : k + size]]
            for g in names:
                shares[g].append(members.count(g) / len(members))
            if len(shares[names[0]]) == steps:
                break
        epoch += 1
    return {
        "steps": steps,
        "examples_per_step": size,
        "order": "length-grouped" if sampler.group_by_length else "shuffled",
        "share": {
            g: {
                "min": min(v),
                "median": float(statistics.median(v)),
                "max": max(v),
                "overall": groups.count(g) / len(groups),
            }
            for g, v in shares.items()
        },
    }


def _make_trainer_class() -> type:
    """Return the Trainer subclass that opens the batch's steering contexts around the loss."""
    from transformers import Trainer

    class SteeringTrainer(Trainer):
        """Trainer whose loss runs inside the batch's steering contexts."""

        steer_layers: torch.nn.ModuleList

        def _get_train_sampler(self, train_dataset: Any = None) -> EpochSeededSampler:
            # A data order reproducible after a resume (see EpochSeededSampler).
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            args = self.args
            grouped = getattr(args, "train_sampling_strategy", None) == "group_by_length" or bool(
                getattr(args, "group_by_length", False)
            )  # never with packing (see _training_args)
            return EpochSeededSampler(
                [len(f["input_ids"]) for f in dataset],
                args.train_batch_size * args.gradient_accumulation_steps,
                args.seed,
                grouped,
            )

        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            # A packed batch counts its real tokens on the host (no attention mask to sum,
            # and no device read per micro-batch).
            if "num_tokens" not in inputs:
                super()._track_num_input_tokens(inputs)
                return
            n = torch.tensor(int(inputs["num_tokens"]), device=self.args.device)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(n).sum())

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            groups = inputs.pop("steer", None)
            choice_ids = inputs.pop("choice_ids", None)
            cached = inputs.pop("no_grad_mask", None)
            if inputs.pop("num_tokens", None) is not None:
                # Packed batch: labelled positions only, chunked (labelled_nll). Normalised as
                # the parent does: over the whole accumulated batch through num_items_in_batch
                # (times the processes, whose gradients DDP averages), else over this one.
                with steering_groups(self.steer_layers, groups), no_grad_positions(model, cached):
                    total = labelled_nll(model, inputs, choice_ids=choice_ids)
                if num_items_in_batch is None:
                    n = (inputs["labels"][:, 1:] != -100).sum().clamp_min(1)
                    return total / n
                loss = total / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes
                return loss
            if choice_ids is not None:
                # Forced choice (one labelled token per row, scored against its choices only),
                # normalised like the packed path.
                labels = inputs.pop("labels")
                with steering_groups(self.steer_layers, groups), no_grad_positions(model, cached):
                    logits = model(**inputs, use_cache=False).logits
                total = forced_choice_nll(logits, labels, choice_ids)
                if num_items_in_batch is None:
                    return total / labels.shape[0]
                loss = total / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes
                return loss
            # The parent computes the model's own token-weighted loss, normalised over the
            # whole accumulated (and all-device) batch through num_items_in_batch.
            with steering_groups(self.steer_layers, groups), no_grad_positions(model, cached):
                return super().compute_loss(
                    model,
                    inputs,
                    return_outputs=return_outputs,
                    num_items_in_batch=num_items_in_batch,
                )

    return SteeringTrainer


def _finite(x: float | None) -> float | None:
    """Return x, or None when it is missing or not finite (JSON has no NaN)."""
    return x if x is not None and math.isfinite(x) else None


class _Monitor:
    """Guard, curve and evaluation state shared by the Trainer callback."""

    EMA_BETA = 0.9

    def __init__(
        self,
        cfg: LoraTrainConfig,
        evaluate: Callable[[Any, int], dict[str, float]],
    ) -> None:
        self.cfg = cfg
        self.evaluate = evaluate
        self.rows: dict[int, dict[str, Any]] = {}
        self.window: list[tuple[float, float | None, float | None]] = []
        self.raw_ema = 0.0
        self.ema = 0.0
        self.ema_steps = 0
        self.initial: float | None = None
        self.bad_steps = 0
        self.warmup = 0
        self.eval_seconds = 0.0
        self.last_eval_step = -1

    def row(self, step: int) -> dict[str, Any]:
        """Return the curve row of a step, created on first use."""
        return self.rows.setdefault(step, {"step": step})

    def guard(self, step: int, loss: float) -> None:
        """Raise TrainingDiverged on a NaN/inf loss beyond patience or a diverging loss."""
        if not math.isfinite(loss):
            self.bad_steps += 1
            if self.bad_steps > self.cfg.nan_patience:
                kind = "NaN" if math.isnan(loss) else "inf"
                raise TrainingDiverged(f"loss is {kind} at step {step}")
            return
        self.bad_steps = 0
        # Bias-corrected EMA (as in Adam): its first value equals the first loss, which is the
        # reference "initial" loss; later single spikes are damped by the smoothing.
        self.ema_steps += 1
        self.raw_ema = self.EMA_BETA * self.raw_ema + (1 - self.EMA_BETA) * loss
        self.ema = self.raw_ema / (1 - self.EMA_BETA**self.ema_steps)
        if self.initial is None:
            self.initial = loss
        factor = self.cfg.divergence_factor
        if factor is not None and step > self.warmup and self.ema > factor * self.initial:
            raise TrainingDiverged(
                f"training diverged at step {step}: loss {self.ema:.4g} (initial {self.initial:.4g})"
            )

    def on_step_log(
        self, step: int, logs: dict[str, float], last: bool, model: Any, is_main: bool
    ) -> None:
        """Guard one step's loss, add a curve row every log_every steps, evaluate when due."""
        loss = float(logs["loss"])
        self.guard(step, loss)
        self.window.append((loss, logs.get("learning_rate"), logs.get("grad_norm")))
        if step % self.cfg.log_every == 0 or last:
            losses = [v[0] for v in self.window]
            norms = [float(v[2]) for v in self.window if v[2] is not None]
            row = self.row(step)
            row["loss"] = _finite(sum(losses) / len(losses))
            lr = self.window[-1][1]
            row["lr"] = float(lr) if lr is not None else None
            row["grad_norm"] = _finite(sum(norms) / len(norms)) if norms else None
            self.window = []
            log.info(
                "step %d: loss %s lr %s grad_norm %s",
                step,
                row["loss"],
                row["lr"],
                row["grad_norm"],
            )
        due = self.cfg.eval_every is not None and step % self.cfg.eval_every == 0
        if is_main and (due or last):
            self.run_eval(model, step)

    def run_eval(self, model: Any, step: int) -> None:
        """Evaluate once per step and merge the values into that step's curve row."""
        if step == self.last_eval_step:
            return
        t0 = time.perf_counter()
        values = self.evaluate(model, step)
        self.eval_seconds += time.perf_counter() - t0
        self.last_eval_step = step
        if values:
            self.row(step).update(values)
            log.info("step %d eval: %s", step, values)

    def curve(self) -> list[dict[str, Any]]:
        """Return the curve rows in step order."""
        return [self.rows[s] for s in sorted(self.rows)]

    STATE_KEYS = ("raw_ema", "ema", "ema_steps", "initial", "bad_steps", "last_eval_step")

    def state_dict(self) -> dict[str, Any]:
        """Return what a resumed run needs to continue the curve and the guard exactly."""
        state = {k: getattr(self, k) for k in self.STATE_KEYS}
        state.update(rows=self.curve(), window=[list(w) for w in self.window])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict() saved with a checkpoint."""
        for k in self.STATE_KEYS:
            setattr(self, k, state[k])
        self.rows = {int(r["step"]): dict(r) for r in state["rows"]}
        self.window = [tuple(w) for w in state["window"]]


def _make_callback(monitor: _Monitor) -> Any:
    """Return a TrainerCallback feeding the monitor."""
    from transformers import TrainerCallback

    class MonitorCallback(TrainerCallback):
        """Per-step NaN/divergence guard, curve rows and evaluations."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            monitor.warmup = args.get_warmup_steps(state.max_steps)
            # A resumed run restored the step-0 evaluation with the monitor state.
            if state.is_world_process_zero and state.global_step == 0:
                monitor.run_eval(kwargs["model"], 0)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # The Trainer has written checkpoint-<step> (every rank its RNG state); the monitor
            # file, written last and atomically, marks it complete. Older ones go only then,
            # so a kill at any instant leaves at least one complete checkpoint once one exists.
            wait_for_everyone()
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
                with atomic_path(ckpt / MONITOR_FILE) as tmp:
                    # NaN losses inside the guard window are legal here (json writes NaN).
                    tmp.write_text(json.dumps(monitor.state_dict()), encoding="utf-8")
                for old in Path(args.output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
                    if old != ckpt:
                        shutil.rmtree(old, ignore_errors=True)
            wait_for_everyone()

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            # Logs are emitted every step (logging_steps=1) and the loss in them is already
            # averaged over all processes, so every rank takes the same stop decision.
            if not logs or "loss" not in logs:
                return
            step = state.global_step
            monitor.on_step_log(
                step, logs, step >= state.max_steps, kwargs["model"], state.is_world_process_zero
            )

    return MonitorCallback()


def _training_args(
    cfg: LoraTrainConfig, output_dir: str, grad_accum: int, device: torch.device
) -> Any:
    """Return TrainingArguments for the config: per-step logs, checkpoints every save_every."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    on_gpu = device.type == "cuda"
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=cfg.epochs if cfg.epochs is not None else 1.0,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        # Every step is logged so the guard sees each step's loss; curve rows are coarser.
        logging_strategy="steps",
        logging_steps=1,
        logging_nan_inf_filter=False,
        eval_strategy="no",
        # Checkpoints every save_every steps (and after the last one); pruning is done by the
        # monitor callback once the newer checkpoint is complete.
        save_strategy="steps" if cfg.save_every is not None else "no",
        save_steps=cfg.save_every if cfg.save_every is not None else 500,
        save_total_limit=None,
        save_only_model=False,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=device.type == "cpu",
        optim="adamw_torch_fused" if on_gpu else "adamw_torch",
        dataloader_pin_memory=on_gpu,
    )
    # Field names moved between transformers 5 releases; pass whichever this one has.
    # Non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen).
    ckpt_kwargs = {"use_reentrant": False} if cfg.gradient_checkpointing else None
    if "activation_checkpointing" in names:
        kwargs["activation_checkpointing"] = cfg.gradient_checkpointing
        kwargs["activation_checkpointing_kwargs"] = ckpt_kwargs
    else:
        kwargs["gradient_checkpointing"] = cfg.gradient_checkpointing
        kwargs["gradient_checkpointing_kwargs"] = ckpt_kwargs
    warmup: float = cfg.warmup_steps if cfg.warmup_steps is not None else 0
    if cfg.warmup_steps is None and cfg.warmup_ratio > 0:
        if "warmup_ratio" in names:
            kwargs["warmup_ratio"] = cfg.warmup_ratio
        else:
            warmup = cfg.warmup_ratio  # values below 1 are read as a ratio
    kwargs["warmup_steps"] = warmup
    # Packed batches take examples in random order: there is no padding to save by sorting,
    # and length-sorted steps can hold one data group only (short facts all in a few steps).
    grouped = cfg.group_by_length and not cfg.packing
    if "train_sampling_strategy" in names:
        kwargs["train_sampling_strategy"] = "group_by_length" if grouped else "random"
    else:
        kwargs["group_by_length"] = grouped
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in names})


# ---- the entry point -------------------------------------------------------------------------


def train_lora(
    loaded: LoadedModel,
    train: list[TrainExample],
    cfg: LoraTrainConfig,
    out_dir: Path,
    *,
    eval_hook: EvalHook | None = None,
    val: list[TrainExample] | None = None,
    metadata: dict[str, Any] | None = None,
) -> TrainResult:
    """Return the result of LoRA-training `loaded` on `train`; the adapter lands in out_dir.

    After success `loaded.model` is the trained PeftModel (eval mode): use
    `loaded.model.disable_adapter()` for base-model behaviour. On failure (TrainingDiverged
    included) the LoRA layers are removed again and nothing appears at out_dir; the
    checkpoints in `<out_dir>.partial` stay for a re-run to resume from, except after
    TrainingDiverged / TrainingError.
    eval_hook(model, step) runs on the main process under torch.no_grad in eval mode and
    returns {name: value} recorded in the curve.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    if isinstance(loaded.model, PeftModel):
        raise TrainingError(f"{loaded.name}: model already carries an adapter; load the base model")
    extra = dict(metadata or {})
    clash = sorted(set(extra) & set(RESERVED_METADATA))
    if clash:
        raise TrainingError(f"metadata keys {clash} are reserved by train_lora")
    grad_accum = gradient_accumulation_steps(cfg, world_size())
    data = prepare_examples(loaded, train, cfg.max_length, "train")
    val_data = prepare_examples(loaded, val, cfg.max_length, "val") if val else None
    pad_id = loaded.tokenizer.pad_token_id
    if pad_id is None:
        raise TrainingError(f"{loaded.name}: tokenizer has no pad token")
    collator = LoraCollator(pad_id, loaded.hidden_size)
    train_collator = (
        PackedCollator(pad_id, loaded.hidden_size, cfg.max_length) if cfg.packing else collator
    )

    set_seed(cfg.seed)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    check_target_modules(loaded.model, cfg.target_modules, cfg.path_of("target_modules"))
    peft_model = get_peft_model(loaded.model, lora)

    def evaluate(model: Any, step: int) -> dict[str, float]:
        values: dict[str, float] = {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if val_data is not None:
                    values["val_loss"] = assistant_nll(
                        model, val_data.features, collator, cfg.per_device_batch_size
                    )
                if eval_hook is not None:
                    for key, value in (eval_hook(model, step) or {}).items():
                        if key in CURVE_KEYS:
                            raise TrainingError(f"eval_hook returned reserved key {key!r}")
                        values[str(key)] = float(value)
        finally:
            if was_training:
                model.train()
        return values

    monitor = _Monitor(cfg, evaluate)
    resume_from: Path | None = None
    if cfg.save_every is not None:
        fingerprint = resume_fingerprint(loaded, cfg, train, val, grad_accum)
        trainer_dir = str(partial_dir(out_dir))
        resume_from = prepare_work_dir(Path(trainer_dir), fingerprint)
        if resume_from is not None:
            state = json.loads((resume_from / MONITOR_FILE).read_text(encoding="utf-8"))
            monitor.load_state_dict(state)
            log.info("%s: resuming from %s", out_dir, resume_from)
    else:
        trainer_dir = tempfile.mkdtemp(prefix="llmlab-trainer-")
    try:
        args = _training_args(cfg, trainer_dir, grad_accum, loaded.device)
        trainer = _make_trainer_class()(
            model=peft_model,
            args=args,
            data_collator=train_collator,
            train_dataset=data.features,
            callbacks=[_make_callback(monitor), live_callback(monitor, out_dir)],
        )
        trainer.steer_layers = decoder_layers(peft_model)
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        t_train = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        train_seconds = time.perf_counter() - t_train - monitor.eval_seconds
        state = trainer.state
        steps, tokens = int(state.global_step), int(state.num_input_tokens_seen)
        is_main = trainer.is_world_process_zero()
        model = trainer.model
        del trainer
    except BaseException as e:
        loaded.model = peft_model.unload()
        # Checkpoints stay for a re-run to resume from, unless the run can never succeed as
        # configured (a resumed run would diverge again).
        if cfg.save_every is None:
            shutil.rmtree(trainer_dir, ignore_errors=True)  # this process's own temp dir
        elif isinstance(e, TrainingDiverged | TrainingError) and is_main_process():
            discard(Path(trainer_dir))
        raise
    if cfg.save_every is None:
        shutil.rmtree(trainer_dir, ignore_errors=True)

    model.eval()
    loaded.model = model
    loaded.device = next(model.parameters()).device
    curve = monitor.curve()
    final_train = next((r["loss"] for r in reversed(curve) if r.get("loss") is not None), None)
    final_val = next((r["val_loss"] for r in reversed(curve) if "val_loss" in r), None)
    tokens_per_s = tokens / train_seconds if train_seconds > 0 else 0.0
    meta: dict[str, Any] = {
        "base_model": loaded.name,
        "config": cfg.model_dump(mode="json"),
        "data_sha256": examples_sha256(train),
        "val_sha256": examples_sha256(val) if val else None,
        "n_examples": len(train),
        "n_val": len(val) if val else 0,
        "n_truncated": data.n_truncated,
        "n_dropped": data.n_dropped,
        "final_train_loss": final_train,
        "final_val_loss": final_val,
        "steps": steps,
        "tokens_seen": tokens,
        "gradient_accumulation_steps": grad_accum,
        "world_size": world_size(),
        "train_time_s": round(train_seconds, 3),
        "tokens_per_s": round(tokens_per_s, 2),
        "versions": library_versions(),
        "resumed_from_step": checkpoint_step(resume_from) if resume_from else None,
        "batch_mix": batch_mix(data.features, cfg, grad_accum, steps),
    }
    meta.update(extra)
    if is_main:
        meta["wall_time_s"] = round(time.perf_counter() - t_start, 3)
        write_output(out_dir, model, meta, curve)
        # Only once the adapter is in place: a kill before this leaves the final checkpoint,
        # from which a re-run resumes with nothing left to train.
        if cfg.save_every is not None:
            discard(Path(trainer_dir))
    wait_for_everyone()
    return TrainResult(out_dir, curve, final_train, final_val, tokens_per_s, steps, tokens, model)
