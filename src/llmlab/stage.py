"""Entry-point wrapper for DVC stage scripts: one error line, an exit status, common set-up.

`run_stage` is the one place that turns an exception into what a stage prints: a single line
`error: <what>, <where>; <hint>` on stderr and exit status 1 (130 after Ctrl-C). Bad input
and refused runs (the project's own error types) already name the file, param or value at
fault; anything else is named by its type and message and located at the innermost line of
llmlab code it passed through. `LLMLAB_LOG=DEBUG` prints the traceback above the line.
"""

from __future__ import annotations

import logging
import os
import random
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmlab.gpu import claim_gpus

log = logging.getLogger("llmlab")

HINT = "LLMLAB_LOG=DEBUG shows the traceback"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
MAX_MESSAGE_CHARS = 500
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_PACKAGE_DIR = Path(__file__).resolve().parent


# The exception types that mean bad input or a refused run (not a bug), by defining module.
USER_ERRORS: dict[str, tuple[str, ...]] = {
    "llmlab.adapters": ("AdapterError",),
    "llmlab.chat": ("ChatError",),
    "llmlab.gpu": ("GpuConfigError",),
    "llmlab.io": ("DataError", "OutputError"),
    "llmlab.judge.base": ("JudgeError",),
    "llmlab.layers": ("LayerSpecError",),
    "llmlab.models": ("ModelLoadError",),
    "llmlab.params": ("ParamsError",),
    "llmlab.steering": ("SteeringError",),
    "llmlab.training": ("TrainingDiverged", "TrainingError"),
}


def user_errors() -> tuple[type[BaseException], ...]:
    """Return the user-error types (USER_ERRORS) of the modules this process has imported.

    An exception of a type defined in a module that was never imported cannot have been raised,
    so nothing is imported here: a stage's code (and the code DVC records as its dependencies)
    is what the stage itself imports, not every module whose errors run_stage knows.
    """
    found: list[type[BaseException]] = []
    for module, names in USER_ERRORS.items():
        loaded = sys.modules.get(module)
        if loaded is not None:
            found.extend(getattr(loaded, name) for name in names)
    return tuple(found)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _one_line(text: str) -> str:
    """Return `text` with its lines joined and cut to MAX_MESSAGE_CHARS."""
    line = re.sub(r"\s+", " ", text).strip()
    if len(line) > MAX_MESSAGE_CHARS:
        line = line[: MAX_MESSAGE_CHARS - 3].rstrip() + "..."
    return line


def _where(err: BaseException) -> str:
    """Return `file:line in function` of the innermost frame in llmlab code (else the last)."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    ours = [
        f
        for f in frames
        if Path(f.filename).resolve().is_relative_to(_PACKAGE_DIR)
        and Path(f.filename).resolve() != Path(__file__).resolve()  # run_stage is always there
    ]
    frame = (ours or frames)[-1]
    path = Path(frame.filename)
    shown = (
        path.resolve().relative_to(_PACKAGE_DIR.parent)
        if ours
        else Path(*path.parts[-2:])  # a library's file: its package and module suffice
    )
    return f"{shown}:{frame.lineno} in {frame.name}"


def error_line(err: BaseException, expected: tuple[type[BaseException], ...] = ()) -> str:
    """Return the one line a stage prints for `err`.

    An expected (user) error is its message, which names the file, param or value at fault.
    Anything else gets its type, its message (an OS error's path included) and where it
    was raised.
    """
    if isinstance(err, expected):
        what = _one_line(str(err)) or type(err).__name__
        return f"error: {what}; {HINT}"
    if isinstance(err, OSError) and err.strerror:
        named = f"{err.filename}: " if err.filename is not None else ""
        message = f"{named}{err.strerror}"
    else:
        message = str(err)
    what = _one_line(f"{type(err).__name__}: {message}" if message else type(err).__name__)
    where = _where(err)
    return f"error: {what}, at {where}; {HINT}" if where else f"error: {what}; {HINT}"


def run_stage(main: Callable[[], None], gpus: int | None = None) -> None:
    """Run a stage's main(); any error prints one line naming it and exits 1 (Ctrl-C: 130).

    Before main() the stage takes `gpus` free GPUs (default LLMLAB_GPUS_PER_STAGE, 1) through
    llmlab.gpu's lock files and holds them until the process ends; CPU-only stages pass 0.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    given = os.environ.get("LLMLAB_LOG", "INFO")
    level = given.upper()
    if level not in LOG_LEVELS:
        print(
            f"error: LLMLAB_LOG={given!r} is not a log level (use one of {', '.join(LOG_LEVELS)})",
            file=sys.stderr,
        )
        sys.exit(EXIT_ERROR)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        claim_gpus(gpus)
        main()
    except KeyboardInterrupt:
        log.debug("interrupted", exc_info=True)
        print("error: interrupted (Ctrl-C); no output was left half-written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - the one place any error becomes a line and a status
        log.debug("stage failed", exc_info=True)
        try:
            expected = user_errors()
        except Exception:  # noqa: BLE001 - a broken install must not hide the original error
            expected = ()
        print(error_line(e, expected), file=sys.stderr)
        sys.exit(EXIT_ERROR)
