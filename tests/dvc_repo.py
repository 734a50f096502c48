"""A throw-away DVC repository holding this project's pipeline, for end-to-end stage tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_repo(tmp: Path, model_dir: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Return a new DVC repo (no git) with the project's dvc.yaml, src/ and data/.

    params.yaml selects the model directory `model_dir` as model `tiny`, CPU fp32; `overrides`
    replaces whole top-level sections (e.g. {"persona": {...}}); a family section without
    `model` keeps the project's.
    """
    repo = tmp / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data", repo / "data", ignore=shutil.ignore_patterns("*.partial"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"]["tiny"] = {"source": "local", "path": str(model_dir), "chat": True}
    params["model"] = "tiny"
    params["runtime"] = {"device": "cpu", "dtype": "float32", "attn_implementation": "eager"}
    for name, section in (overrides or {}).items():
        # dvc.yaml declares `<family>.model` a param of the family's stages, so a replaced
        # section keeps the project's (null: the top-level model) unless it names its own.
        base = params.get(name)
        if isinstance(base, dict) and "model" in base and isinstance(section, dict):
            section = {"model": base["model"], **section}
        params[name] = section
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "init", "--no-scm", "-q"], repo)
    return repo


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command with the test interpreter's bin directory first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(cwd / "src")
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def repro(repo: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    """Run `dvc repro` of the given stages (with their upstream stages) in the repo."""
    return run(["dvc", "repro", *targets], repo)
