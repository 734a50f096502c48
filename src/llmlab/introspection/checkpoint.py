"""Best-checkpoint selection: keep the adapter of the evaluation with the best validation score.

The anchor's recipe evaluates every few hundred optimizer steps and keeps the adapter with the
highest validation accuracy (a later evaluation replaces it only when strictly better); the
adapter it evaluates is that one, not the last. `BestCheckpoint` does the same from the
training loop's evaluation hook: each better evaluation's adapter is saved beside the output
(`<out>.best/`, so a resumed run still knows its best step), and `apply` writes it into the
finished adapter directory and records which step it came from.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from llmlab.adapters import METADATA_FILE, WEIGHTS_FILE, check_safetensors
from llmlab.io import read_json, staged_dir, write_json

BEST_FILE = "best.json"


def best_dir(out_dir: Path) -> Path:
    """Return where the best adapter so far is kept while `out_dir` trains."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".best")


class BestCheckpoint:
    """Track the best validation score over a run's evaluations and keep that adapter."""

    def __init__(self, out_dir: Path, metric: str) -> None:
        self.dir = best_dir(out_dir)
        self.metric = metric
        self.record: dict[str, Any] | None = None

    def observe(self, model: Any, step: int, values: dict[str, float]) -> None:
        """Keep the adapter of this evaluation when it beats every earlier one.

        Step 0 is the untrained adapter (LoRA's B matrices are zero): a fresh run starts there,
        so a best kept by an earlier, different run is discarded; it is never a candidate,
        as the anchor evaluates only after optimizer steps. A resumed run's first evaluation is
        at a later step and continues from the best the interrupted run saved.
        """
        if step == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.record = None
            return
        if self.record is None and (self.dir / BEST_FILE).is_file():
            self.record = read_json(self.dir / BEST_FILE)
        score = values[self.metric]
        if self.record is not None and not score > self.record["value"]:
            return
        record = {"step": step, "metric": self.metric, "value": score, "values": values}
        with staged_dir(self.dir) as staging:
            # peft writes only the adapter's weights (safetensors) and its config.
            model.save_pretrained(staging, safe_serialization=True)
            write_json(staging / BEST_FILE, record)
        self.record = record

    def apply(self, out_dir: Path, last_step: int) -> dict[str, Any]:
        """Put the best adapter into `out_dir` and record the selection in its metadata.

        Returns the selection record. Without any evaluation after step 0 there is nothing to
        select from: an error, since the written adapter would not be the one the params ask for.
        """
        out_dir = Path(out_dir)
        if self.record is None and (self.dir / BEST_FILE).is_file():
            self.record = read_json(self.dir / BEST_FILE)
        if self.record is None:
            raise ValueError(
                f"{out_dir}: introspection.train.select_checkpoint: no evaluation after step 0 "
                "to select from (set train.lora.eval_every)"
            )
        check_safetensors(self.dir / WEIGHTS_FILE)
        shutil.copyfile(self.dir / WEIGHTS_FILE, out_dir / f".{WEIGHTS_FILE}.tmp")
        os.replace(out_dir / f".{WEIGHTS_FILE}.tmp", out_dir / WEIGHTS_FILE)
        selection = {
            "rule": f"highest {self.metric} over the evaluations after step 0 (ties: earliest)",
            "step": self.record["step"],
            "last_step": last_step,
            self.metric: self.record["value"],
            "values": self.record["values"],
        }
        meta = read_json(out_dir / METADATA_FILE)
        meta["selected_checkpoint"] = selection
        write_json(out_dir / METADATA_FILE, meta)
        shutil.rmtree(self.dir, ignore_errors=True)
        return selection
