"""Resumable LoRA training: what checkpoints were made from, and the work directory they live in.

Every `save_every` optimizer steps `llmlab.training.train_lora` leaves a checkpoint in
`<out_dir>.partial/checkpoint-<step>`, complete once its monitor file is written (last). The work
directory records, in `resume.json`, the fingerprint of the run that made it: base model, config,
data digests, process count and library versions. A re-run whose fingerprint is the same resumes
from the newest complete checkpoint; anything else changed discards the checkpoints (saying which
fields differ) and starts fresh. Removal goes through a rename first, so a kill never leaves a
half-deleted directory that looks like a work directory.

Under `accelerate launch` only the main process touches the work directory; the others wait for
it and then read the same checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmlab.io import write_json

if TYPE_CHECKING:
    from llmlab.config_base import LoraTrainConfig
    from llmlab.models import LoadedModel
    from llmlab.training import TrainExample

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
RESUME_FILE = "resume.json"  # in <out_dir>.partial: what the checkpoints were made from
MONITOR_FILE = "llmlab_monitor.json"  # in a checkpoint: curve and guard state, written last


def examples_sha256(examples: Sequence[TrainExample]) -> str:
    """Return the sha256 of the serialized examples (messages, steering vectors by digest)."""
    h = hashlib.sha256()
    for ex in examples:
        row: dict[str, Any] = {"messages": ex.messages}
        if ex.loss_tokens is not None:
            row["loss_tokens"] = ex.loss_tokens
        if ex.loss_choices is not None:
            row["loss_choices"] = list(ex.loss_choices)
        if ex.no_grad_prefix is not None:
            row["no_grad_prefix"] = ex.no_grad_prefix
        if ex.group is not None:
            row["group"] = ex.group
        if ex.steer is not None:
            vec = ex.steer.vector.detach().float().cpu().contiguous().numpy().tobytes()
            row["steer"] = {
                "vector_sha256": hashlib.sha256(vec).hexdigest(),
                "magnitude": float(ex.steer.magnitude),
                "layers": list(ex.steer.layers),
                "span": list(ex.steer.span) if ex.steer.span is not None else None,
            }
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def partial_dir(out_dir: Path) -> Path:
    """Return the work directory that holds the resumable checkpoints of `out_dir`."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


def out_name(work: Path) -> str:
    """Return the output directory name a work directory belongs to."""
    return work.name.removesuffix(".partial")


def checkpoint_step(path: Path) -> int | None:
    """Return N of a `checkpoint-N` directory name (None for other names)."""
    suffix = path.name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def latest_checkpoint(work: Path) -> Path | None:
    """Return the newest complete checkpoint in a work directory (its monitor file written)."""
    best: tuple[int, Path] | None = None
    for p in Path(work).glob(f"{CHECKPOINT_PREFIX}*"):
        step = checkpoint_step(p)
        if step is not None and (p / MONITOR_FILE).is_file() and (best is None or step > best[0]):
            best = (step, p)
    return best[1] if best else None


def resume_fingerprint(
    loaded: LoadedModel,
    cfg: LoraTrainConfig,
    train: Sequence[TrainExample],
    val: Sequence[TrainExample] | None,
    grad_accum: int,
) -> dict[str, Any]:
    """Return what checkpoints must have been made from for a run to resume from them."""
    config = getattr(loaded.model, "config", None)
    return {
        "base_model": loaded.name,
        "base_path": str(getattr(config, "_name_or_path", "")),
        "hidden_size": loaded.hidden_size,
        "n_layers": loaded.n_layers,
        "dtype": str(next(loaded.model.parameters()).dtype),
        "config": cfg.model_dump(mode="json"),
        "data_sha256": examples_sha256(train),
        "val_sha256": examples_sha256(val) if val else None,
        "gradient_accumulation_steps": grad_accum,
        "world_size": world_size(),
        "versions": library_versions(),
    }


def prepare_work_dir(work: Path, fingerprint: dict[str, Any]) -> Path | None:
    """Make `work` ready for this run; return the checkpoint to resume from, if any.

    Checkpoints made from another config, data set or base model are discarded (with a log
    line saying why); so are incomplete checkpoints a kill left behind.
    """
    resume: Path | None = None
    if is_main_process():
        record = work / RESUME_FILE
        if work.exists():
            try:
                before = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                before = None
            if before != fingerprint:
                changed = (
                    sorted(k for k in fingerprint if before.get(k) != fingerprint[k])
                    if isinstance(before, dict)
                    else ["no readable " + RESUME_FILE]
                )
                log.warning("%s: starting fresh; the checkpoints differ in %s", work, changed)
                discard(work)
        if not work.exists():
            work.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{work.name}.", dir=work.parent))
            write_json(staging / RESUME_FILE, fingerprint)
            os.replace(staging, work)
        # Staging directories a kill left beside the output (see training_output.write_output).
        stale = re.compile(re.escape(f".{out_name(work)}.") + r"(old\.|partial\.)?[\w]{8}")
        for p in work.parent.iterdir():
            if p.is_dir() and stale.fullmatch(p.name):
                shutil.rmtree(p, ignore_errors=True)
        resume = latest_checkpoint(work)
        for p in work.glob(f"{CHECKPOINT_PREFIX}*"):
            if p != resume:  # incomplete (no monitor file) or superseded
                shutil.rmtree(p, ignore_errors=True)
        for p in work.glob(".*"):  # temporary files of an interrupted atomic write
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    wait_for_everyone()
    if not is_main_process():
        resume = latest_checkpoint(work)
    return resume


def discard(path: Path) -> None:
    """Remove a directory by first renaming it aside (to a name the next run cleans up).

    A kill in the middle of removing a work directory must not leave a half-deleted one that
    looks like a work directory to the next run.
    """
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def world_size() -> int:
    """Return the number of processes (1 unless started by accelerate launch / torchrun)."""
    from accelerate import PartialState

    return PartialState().num_processes


def is_main_process() -> bool:
    """Return whether this is the main process (always true without accelerate launch)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def library_versions() -> dict[str, str]:
    """Return the versions of the libraries that shape the adapter."""
    import peft
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def wait_for_everyone() -> None:
    """Block until every process got here (no-op in a single process)."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        state.wait_for_everyone()
