"""Live training curves through dvclive, with a progress bar, for every LoRA finetune.

`train_lora` records one curve row per `log_every` steps (loss, learning rate, gradient norm)
and merges the evaluations into it (validation loss and the family's eval-hook values, e.g.
`hook_format_triggered`). This callback writes every new value of those rows to dvclive as soon
as the row has it, so `dvc plots show`, the VS Code extension and DVC Studio draw the curves
while the run is going, and each experiment commit carries them afterwards.

The curves of an adapter written to `models/<family>/<name>` (every training stage) go to
`dvclive/<family>/<name>/`: git-kept `cache: false` stage outs, drawn by the top-level `plots:`
of dvc.yaml. An adapter written anywhere else (a library call outside the pipeline) gets the
progress bar and its `curve.json`, and no dvclive directory beside it.

dvclive's own `DVCLiveCallback` sees only the Trainer's logs, so it would miss the evaluations,
and it ends the run as a DVC experiment of its own; inside a DVC stage the pipeline owns that,
hence `Live` is driven directly here with `save_dvc_exp=False` and no dvc.yaml of its own.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm


class CurveSource(Protocol):
    """What the callback reads: the training monitor's curve rows."""

    def curve(self) -> list[dict[str, Any]]: ...


def live_dir(out_dir: str | os.PathLike[str]) -> Path | None:
    """Return where the dvclive files of the adapter written to `out_dir` go (None: nowhere)."""
    rel = Path(os.path.relpath(Path(out_dir).resolve(), Path.cwd().resolve()))
    if len(rel.parts) > 1 and rel.parts[0] == "models":
        return Path("dvclive", *rel.parts[1:])
    return None


def live_callback(monitor: CurveSource, out_dir: str | os.PathLike[str]) -> Any:
    """Return the Trainer callback for a run whose adapter goes to `out_dir`."""
    # transformers is imported here, not at module import, like the rest of llmlab.training.
    from transformers import TrainerCallback

    class LiveCurveCallback(LiveCurves, TrainerCallback):
        pass

    return LiveCurveCallback(monitor, out_dir)


class LiveCurves:
    """Write the monitor's curve rows to dvclive as they fill; show a progress bar on a TTY.

    The Trainer calls the `on_*` methods; the curve rows come from the monitor, which the
    training callback before this one has already updated for the step.
    """

    def __init__(self, monitor: CurveSource, out_dir: str | os.PathLike[str]) -> None:
        self.monitor = monitor
        self.dir = live_dir(out_dir)
        self.live: Any = None
        self.bar: Any = None
        self.sent: dict[int, set[str]] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        # disable=None: the bar draws on a terminal and stays silent in logs and DVC queues.
        self.bar = tqdm(
            total=state.max_steps, initial=state.global_step, disable=None, unit="step",
            desc="LoRA training", dynamic_ncols=True,
        )  # fmt: skip
        if self.dir is None:
            return
        from dvclive import Live

        # resume=False empties the directory. A run resumed from a checkpoint has its whole
        # curve so far back in the monitor, and the flush below writes all of it again, so the
        # files hold exactly the curve of the adapter whether or not the run was interrupted.
        self.live = Live(
            dir=str(self.dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=None
        )
        self.flush()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.live is not None:
            self.flush()
            self.live.end()

    def flush(self) -> None:
        """Write every curve value not yet written, in step order, and refresh the summary."""
        if self.live is None:
            return
        wrote = False
        for row in self.monitor.curve():
            step = int(row["step"])
            sent = self.sent.setdefault(step, {"step"})
            for key, value in row.items():
                if key in sent or value is None or not math.isfinite(float(value)):
                    continue
                self.live.step = step
                self.live.log_metric(key, float(value))
                sent.add(key)
                wrote = True
        if wrote:
            self.live.make_summary()
