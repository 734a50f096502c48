"""Entry-point wrapper for DVC stage scripts: one-line errors, non-zero exit, common set-up."""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Callable

import numpy as np

from llmlab.gpu import GpuConfigError, claim_gpus

log = logging.getLogger("llmlab")


def user_errors() -> tuple[type[BaseException], ...]:
    """Return the exception types that mean bad input or a refused run (not a bug)."""
    from llmlab.adapters import AdapterError
    from llmlab.chat import ChatError
    from llmlab.io import DataError
    from llmlab.judge.base import JudgeError
    from llmlab.layers import LayerSpecError
    from llmlab.models import ModelLoadError
    from llmlab.params import ParamsError
    from llmlab.steering import SteeringError

    errors: list[type[BaseException]] = [
        AdapterError,
        ChatError,
        DataError,
        JudgeError,
        LayerSpecError,
        ModelLoadError,
        ParamsError,
        SteeringError,
    ]
    try:
        from llmlab.training import TrainingDiverged

        errors.append(TrainingDiverged)
    except ImportError:
        pass
    return tuple(errors)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_stage(main: Callable[[], None], gpus: int | None = None) -> None:
    """Run a stage's main(); a user error prints one line naming its cause and exits 1.

    Before main() the stage takes `gpus` free GPUs (default LLMLAB_GPUS_PER_STAGE, 1) through
    llmlab.gpu's lock files and holds them until the process ends; CPU-only stages pass 0.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=os.environ.get("LLMLAB_LOG", "INFO"),
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        claim_gpus(gpus)
        main()
    except (*user_errors(), GpuConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
