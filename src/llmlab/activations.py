"""Residual-stream activation capture at chosen layers and token positions.

`capture_batch` reads positions from one padded batch. `capture_to_disk` streams a whole item
list to one `.npy` file per layer plus an index of item ids: batches are grouped by length,
each forward pass stops after the deepest needed layer, rows are written into memory-mapped
files as they come, and progress is checkpointed so an interrupted run resumes where it
stopped. The output directory appears (by rename) only when complete.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from llmlab.chat import (
    ChatBatch,
    ChatError,
    EncodedChat,
    Message,
    adds_bos,
    collate,
    encode_chat,
    render,
    token_budget_batches,
    user_end_index,
)
from llmlab.hooks import record_layers
from llmlab.io import DataError, read_json, replace_dir, write_json
from llmlab.models import LoadedModel

INDEX_FILE = "index.json"
PROGRESS_FILE = "progress.npy"


@dataclass(frozen=True)
class CaptureItem:
    """One conversation to read activations from, with a stable id."""

    id: str
    messages: list[Message]


def layer_file(layer: int) -> str:
    """Return the file name holding one layer's activations."""
    return f"layer_{layer:03d}.npy"


def attention_mask_for(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Return the mask a forward pass needs, or None when causal masking alone gives the same.

    In a right-padded batch (every row's padding after its last real token) a real token only
    attends to earlier positions, all real, so the pad tokens cannot change it: the model can
    run without the padding mask, on the fused causal attention kernels. Left padding (or any
    other layout) keeps the mask.
    """
    m = attention_mask
    if m.dim() != 2 or m.shape[1] < 2:
        return None if m.dim() == 2 else m
    if bool((m[:, 1:] <= m[:, :-1]).all()) and bool((m[:, 0] != 0).all()):
        return None
    return m


@torch.no_grad()
def capture_batch(
    loaded: LoadedModel,
    batch: ChatBatch,
    layers: Sequence[int],
    positions: Sequence[str],
) -> dict[tuple[int, str], torch.Tensor]:
    """Return {(layer, position): tensor [batch, hidden]} read from one forward pass."""
    mask = attention_mask_for(batch.attention_mask)
    batch = batch.to(loaded.device)
    if mask is not None:
        mask = batch.attention_mask
    with record_layers(loaded.layers, layers, stop_after_last=True) as store:
        loaded.model(input_ids=batch.input_ids, attention_mask=mask, use_cache=False)
    rows = torch.arange(batch.input_ids.shape[0], device=loaded.device)
    out = {}
    for pos in positions:
        idx = batch.positions(pos).to(loaded.device)
        for layer in layers:
            out[(layer, pos)] = store[layer][rows, idx]
    return out


def encode_items(loaded: LoadedModel, items: Sequence[CaptureItem]) -> list[EncodedChat]:
    """Return the encoded conversations of the items, in order.

    Prompts (conversations not ending in an assistant message, the usual capture input) are
    rendered one by one but tokenized in one batched call, which runs in the tokenizer's native
    code (in parallel where it is allowed to) instead of paying the per-call overhead for each
    item; the result is the same as `encode_chat`, which encodes everything else.
    """
    tok, chat = loaded.tokenizer, loaded.chat
    out: list[EncodedChat | None] = [None] * len(items)
    prompts: list[int] = []
    for i, it in enumerate(items):
        if it.messages and it.messages[-1].get("role") != "assistant" and _batchable(tok):
            prompts.append(i)
        else:
            out[i] = encode_chat(tok, it.messages, chat=chat)
    for lo in range(0, len(prompts), _ENCODE_CHUNK):
        part = prompts[lo : lo + _ENCODE_CHUNK]
        texts = [
            render(tok, items[i].messages, chat=chat, add_generation_prompt=True) for i in part
        ]
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        bos = adds_bos(tok)
        for k, (i, text) in enumerate(zip(part, texts, strict=True)):
            ids = list(enc["input_ids"][k])
            offsets = [tuple(o) for o in enc["offset_mapping"][k]]
            if bos and not text.startswith(tok.bos_token):
                ids, offsets = [tok.bos_token_id, *ids], [(0, 0), *offsets]
            user_end = user_end_index(tok, items[i].messages, text, offsets, chat=chat)
            out[i] = EncodedChat(ids, len(ids), user_end)
    return out  # type: ignore[return-value]


# Prompts tokenized per batched call (bounds the transient memory of one call).
_ENCODE_CHUNK = 4096


def _batchable(tokenizer: Any) -> bool:
    """Return whether the tokenizer gives character offsets for a batch (fast tokenizers)."""
    return bool(getattr(tokenizer, "is_fast", False))


def _run_key(
    loaded: LoadedModel, items: Sequence[CaptureItem], layers: Sequence[int], position: str
) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([loaded.name, list(layers), position]).encode())
    for it in items:
        h.update(json.dumps([it.id, it.messages], ensure_ascii=False).encode())
    return h.hexdigest()


def capture_to_disk(
    loaded: LoadedModel,
    items: Sequence[CaptureItem],
    layers: Sequence[int],
    out_dir: str | Path,
    position: str = "prompt_last",
    batch_size: int = 16,
    max_tokens_per_batch: int | None = 8192,
    store_dtype: str = "float32",
    save_every: int = 8,
    progress: bool = True,
) -> Path:
    """Return out_dir after writing layer_<L>.npy files (row i = items[i]) and index.json.

    Work happens in `<out_dir>.partial`; re-running after an interruption with the same items,
    layers and position resumes from the last checkpoint (every `save_every` batches).
    """
    out = Path(out_dir)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"capture: duplicate item id {dup!r}")
    if not items:
        raise DataError("capture: no items")
    layers = sorted(set(layers))
    key = _run_key(loaded, items, layers, position)
    work = out.with_name(out.name + ".partial")
    meta = {
        "run_key": key,
        "model": loaded.name,
        "layers": layers,
        "position": position,
        "hidden_size": loaded.hidden_size,
        "dtype": store_dtype,
        "n_items": len(items),
    }
    # Encode every item and check its position before touching the disk, so bad input fails
    # without leaving a work directory behind.
    encoded = encode_items(loaded, items)
    for it, enc in zip(items, encoded, strict=True):
        try:
            enc.position(position)
        except ChatError as e:
            raise ChatError(f"capture: item {it.id!r}: {e}") from None
    if work.exists():
        old = _work_meta(work)
        if old.get("run_key") != key or old.get("dtype") != store_dtype:
            shutil.rmtree(work)
    # index.json is written only after every row is flushed: a run killed after that point
    # has nothing left to compute, only the final rename.
    if not (work / INDEX_FILE).is_file():
        _fill_work_dir(
            loaded, encoded, layers, work, meta, position, batch_size, max_tokens_per_batch,
            store_dtype, save_every, progress,
        )  # fmt: skip
        write_json(work / INDEX_FILE, {**meta, "ids": ids})
    _drop_leftovers(work, layers)
    return replace_dir(work, out)


def _drop_leftovers(work: Path, layers: Sequence[int]) -> None:
    """Remove from a finished work directory everything but index.json and the layer files.

    Besides the checkpoint files, a run killed inside an atomic write leaves that write's
    temporary file behind (`.index.json.<random>.json`, `progress.tmp.npy`); the resuming run
    writes its own, so the output must not carry the dead run's copy.
    """
    keep = {INDEX_FILE, *(layer_file(layer) for layer in layers)}
    for entry in work.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _work_meta(work: Path) -> dict[str, Any]:
    """Return the run description of a work directory (meta.json, else index.json), or {}."""
    for name in ("meta.json", INDEX_FILE):
        try:
            old = read_json(work / name)
        except DataError:
            continue
        if isinstance(old, dict):
            return old
    return {}


def _open_layer_files(
    work: Path, layers: Sequence[int], shape: tuple[int, int], store_dtype: str
) -> tuple[dict[int, np.memmap], bool]:
    """Return {layer: writable memmap} and whether any existing file had to be rebuilt."""
    arrays: dict[int, np.memmap] = {}
    rebuilt = False
    for layer in layers:
        f = work / layer_file(layer)
        arr = None
        if f.exists():
            try:
                arr = np.lib.format.open_memmap(f, mode="r+")
            except (ValueError, OSError):
                arr = None  # torn while being created (a kill mid-header)
            if arr is None or arr.shape != shape or arr.dtype != np.dtype(store_dtype):
                arr, rebuilt = None, True
        if arr is None:
            arr = np.lib.format.open_memmap(f, mode="w+", dtype=store_dtype, shape=shape)
        arrays[layer] = arr
    return arrays, rebuilt


def _fill_work_dir(
    loaded: LoadedModel,
    encoded: Sequence[EncodedChat],
    layers: Sequence[int],
    work: Path,
    meta: dict[str, Any],
    position: str,
    batch_size: int,
    max_tokens_per_batch: int | None,
    store_dtype: str,
    save_every: int,
    progress: bool,
) -> None:
    """Compute every row not yet checkpointed in `work`, checkpointing as it goes."""
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "meta.json", meta)
    n = len(encoded)
    arrays, rebuilt = _open_layer_files(work, layers, (n, loaded.hidden_size), store_dtype)
    prog_file = work / PROGRESS_FILE
    if prog_file.exists() and not rebuilt:
        done = np.load(prog_file, allow_pickle=False)
    else:
        # rows a rebuilt file lost cannot count as done
        done = np.zeros(n, dtype=bool)

    todo = [i for i in range(n) if not done[i]]
    lengths = [len(encoded[i].input_ids) for i in todo]
    groups = token_budget_batches(lengths, batch_size, max_tokens_per_batch)
    batches = [[todo[j] for j in b] for b in groups]
    pad = loaded.tokenizer.pad_token_id
    bar = tqdm(total=n, initial=int(done.sum()), disable=not progress, desc="capture")
    # One batch in flight: while the device runs batch k, the host writes batch k-1's rows
    # (copied into pinned memory without blocking). Rows are marked done only once written.
    # A kill can then lose the batch in flight as well as the rows written since the last
    # checkpoint, so checkpoints come one write sooner: still at most `save_every` batches of
    # work are lost. With save_every=1 every batch is written and checkpointed before the next.
    pipelined = save_every >= 2
    every = save_every - 1 if pipelined else 1
    pending: _Pending | None = None
    written = 0

    def finish(p: _Pending) -> None:
        nonlocal written
        values = p.values()
        for j, layer in enumerate(layers):
            arrays[layer][p.rows] = values[j]
        done[p.rows] = True
        bar.update(len(p.rows))
        written += 1
        if written % every == 0:
            _checkpoint(arrays, done, prog_file)

    for rows in batches:
        batch = collate([encoded[i] for i in rows], pad, padding_side="right")
        acts = capture_batch(loaded, batch, layers, [position])
        stacked = torch.stack([acts[(layer, position)] for layer in layers])
        current = _Pending(rows, stacked, store_dtype)
        if pending is not None:
            finish(pending)
            pending = None
        if pipelined:
            pending = current
        else:
            finish(current)
    if pending is not None:
        finish(pending)
    bar.close()
    _checkpoint(arrays, done, prog_file)


_TORCH_FLOATS = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


class _Pending:
    """One batch's rows [layers, rows, hidden] on their way to the host."""

    def __init__(self, rows: list[int], stacked: torch.Tensor, store_dtype: str) -> None:
        self.rows = rows
        self.store_dtype = store_dtype
        target = _TORCH_FLOATS.get(np.dtype(store_dtype).name, torch.float32)
        src = stacked.to(target)
        self.event = None
        if src.device.type == "cuda":
            self.host = torch.empty(src.shape, dtype=target, pin_memory=True)
            self.host.copy_(src, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = src.cpu()

    def values(self) -> np.ndarray:
        """Return the rows as a numpy array of the store dtype (waits for the copy)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy().astype(self.store_dtype, copy=False)


def _checkpoint(arrays: dict[int, np.memmap], done: np.ndarray, prog_file: Path) -> None:
    # Rows reach the files before the progress mask says they are done.
    for arr in arrays.values():
        arr.flush()
        _release_pages(arr)
    tmp = prog_file.with_suffix(".tmp.npy")
    np.save(tmp, done)
    os.replace(tmp, prog_file)


def _release_pages(arr: np.memmap) -> None:
    """Drop the flushed pages of a shared file mapping from this process's resident memory.

    Written rows would otherwise stay mapped until the run ends, so resident memory would grow
    with the output (about 1.5 GB per 10k rows x 9 layers x 4096 floats). The data are in the
    file (and the page cache, which the kernel manages); a later access reads them back.
    """
    mm = getattr(arr, "_mmap", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if mm is None or advice is None or not hasattr(mm, "madvise"):
        return
    try:
        mm.madvise(advice)
    except (OSError, ValueError):
        pass


@dataclass
class Activations:
    """Activations of one layer with their item ids (row order)."""

    ids: list[str]
    values: np.ndarray
    meta: dict[str, Any]

    def select(self, ids: Sequence[str]) -> np.ndarray:
        """Return rows for the given ids, in that order; DataError naming a missing id."""
        where = {i: n for n, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in where]
        if missing:
            raise DataError(f"activations index lacks {len(missing)} id(s), e.g. {missing[0]!r}")
        return self.values[[where[i] for i in ids]]


def read_index(act_dir: str | Path) -> dict[str, Any]:
    """Return the index of an activation directory; errors name the directory."""
    d = Path(act_dir)
    f = d / INDEX_FILE
    if not f.is_file():
        raise DataError(f"{d}: not an activation directory ({INDEX_FILE} missing)")
    index = read_json(f)
    if not isinstance(index, dict):
        raise DataError(f"{f}: expected a JSON object, got {type(index).__name__}")
    for key, kind in (("ids", list), ("layers", list), ("hidden_size", int)):
        if not isinstance(index.get(key), kind):
            raise DataError(f"{f}: field {key!r} missing or not a {kind.__name__}")
    ids = index["ids"]
    if len(set(map(str, ids))) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{f}: duplicate id {dup!r} in 'ids'")
    return index


def load_activations(act_dir: str | Path, layer: int, mmap: bool = True) -> Activations:
    """Return one layer's activations; errors name the file on a missing layer or bad shape."""
    d = Path(act_dir)
    index = read_index(d)
    f = d / layer_file(layer)
    if layer not in index["layers"] or not f.is_file():
        raise DataError(f"{d}: layer {layer} not captured (have {index['layers']})")
    try:
        values = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        # not an .npy file, truncated, or an object array (which would need pickle)
        why = " ".join(str(e).split())
        raise DataError(f"{f}: not a readable numeric .npy file ({why})") from None
    if values.dtype.kind not in "fiu":
        raise DataError(f"{f}: dtype {values.dtype} is not numeric")
    if values.shape != (len(index["ids"]), index["hidden_size"]):
        raise DataError(
            f"{f}: shape {values.shape} does not match index "
            f"({len(index['ids'])} ids x {index['hidden_size']})"
        )
    return Activations(list(index["ids"]), values, index)
