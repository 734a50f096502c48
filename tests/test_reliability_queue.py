"""Two DVC queue workers never write the same file.

A throw-away git + DVC project holds one stage, `python stage.py`, wrapped in the project's
`llmlab.stage.run_stage` (so it takes a GPU lock; the machine pretends to have 2 GPUs). The
stage writes a cached output directory in several steps, pausing between them, and a metric.
An audit hook installed before anything else records the real path of every file the stage
process opens for writing or renames onto, with the stage's start and end times.

Experiments that differ only in `seed` are queued (`dvc exp run --queue -S seed=...`) and run
by `dvc queue start -j 2`. The test then checks that:

- two stages really ran at the same time (else the test would prove nothing);
- no file was written by two experiments; the GPU lock files are opened by every stage that
  tries them but written only by the holder, and no two stages that ran at the same time held
  the same GPU (wrote the same lock file);
- every experiment ran in its own workspace, never the main one, which is left unchanged;
- every experiment's metric and its cached output (read back from the DVC cache through the
  `dvc.lock` of its experiment commit) are its own seed's, whole.

The long version (`-m slow`) queues 6 experiments.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import start_dvc_queue

ROOT = Path(__file__).resolve().parents[1]
PARTS = 3

STAGE = f'''\
"""Write out/part<i>.txt and metrics.json slowly; record every file this process writes."""

import json
import os
import sys
import time

WRITES = []


def audit(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        writing = (
            any(c in mode for c in "wax+")
            if isinstance(mode, str)
            else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
        )
        if writing:
            WRITES.append(os.path.realpath(os.fsdecode(path)))
    elif event in ("os.rename", "os.replace"):
        WRITES.append(os.path.realpath(os.fsdecode(args[1])))


sys.addaudithook(audit)
START = time.time()

import yaml  # noqa: E402

from llmlab.gpu import held_gpus  # noqa: E402
from llmlab.stage import run_stage  # noqa: E402


def main():
    params = yaml.safe_load(open("params.yaml"))
    os.makedirs("out", exist_ok=True)
    for i in range({PARTS}):
        with open(f"out/part{{i}}.txt", "w") as fh:
            fh.write(f"seed {{params['seed']}} part {{i}}\\n")
        time.sleep(params["sleep_s"])
    with open("metrics.json", "w") as fh:
        json.dump({{"value": params["seed"] * 10}}, fh)
    record = {{
        "seed": params["seed"],
        "pid": os.getpid(),
        "cwd": os.path.realpath("."),
        "gpus": held_gpus(),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "start": START,
        "end": time.time(),
        "writes": sorted(set(WRITES)),
    }}
    name = os.path.join(params["log_dir"], f"run-{{params['seed']}}-{{os.getpid()}}.json")
    with open(name + ".tmp", "w") as fh:
        json.dump(record, fh)
    os.replace(name + ".tmp", name)


run_stage(main)
'''

DVC_YAML = {
    "stages": {
        "work": {
            "cmd": "python stage.py",
            "deps": ["stage.py"],
            "params": ["seed", "sleep_s"],
            "outs": ["out"],
            "metrics": [{"metrics.json": {"cache": False}}],
        }
    }
}


def env_for(tmp: Path) -> dict[str, str]:
    """Return the environment of dvc and the stages: this venv first, 2 fake GPUs."""
    env = dict(os.environ)
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(ROOT / "src"),
            "LLMLAB_FAKE_GPUS": "2",
            "LLMLAB_LOCK_DIR": str(tmp / "locks"),
            "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.invalid",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.invalid",
        }
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("LLMLAB_GPUS_PER_STAGE", None)
    return env


def sh(cmd: list[str], repo: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run a command in the repo; fail with its output when it fails."""
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def make_project(tmp: Path, env: dict[str, str], sleep_s: float) -> Path:
    """Return a committed git + DVC repo with the one-stage pipeline."""
    repo = tmp / "repo"
    repo.mkdir()
    (tmp / "runs").mkdir()
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    params = {"seed": 0, "sleep_s": sleep_s, "log_dir": str(tmp / "runs")}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(["dvc", "init", "-q"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-q", "-m", "init"], repo, env)
    return repo


def snapshot(repo: Path) -> dict[str, str]:
    """Return {relative path: sha256} of the workspace files (not .git, not .dvc)."""
    out = {}
    for p in sorted(repo.rglob("*")):
        rel = p.relative_to(repo)
        if p.is_file() and rel.parts[0] not in (".git", ".dvc"):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def wait_for_queue(repo: Path, env: dict[str, str], n: int, timeout: float = 480) -> str:
    """Wait until `n` experiments have finished; return the last `dvc queue status`."""
    deadline = time.monotonic() + timeout
    while True:
        status = sh(["dvc", "queue", "status"], repo, env)
        done = len(re.findall(r"\bSuccess\b", status))
        failed = re.findall(r"\bFailed\b", status)
        assert not failed, f"an experiment failed:\n{status}"
        if done >= n:
            return status
        assert time.monotonic() < deadline, f"queue not done in {timeout}s:\n{status}"
        time.sleep(2)


def cached_output(repo: Path, rev: str) -> dict[str, str]:
    """Return {file: text} of `out` as committed by an experiment, read from the DVC cache."""
    lock = yaml.safe_load(
        subprocess.run(
            ["git", "show", f"{rev}:dvc.lock"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout
    )
    out = next(o for o in lock["stages"]["work"]["outs"] if o["path"] == "out")
    cache = repo / ".dvc" / "cache" / "files" / "md5"

    def obj(md5: str) -> Path:
        return cache / md5[:2] / md5[2:]

    listing = json.loads(obj(out["md5"]).read_text())
    return {e["relpath"]: obj(e["md5"]).read_text() for e in listing}


def experiments(repo: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Return [{rev, seed, value}] of every experiment in `dvc exp show --json`."""
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], repo, env))
    found = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = data["params"]["params.yaml"]["data"]
                metrics = data["metrics"]["metrics.json"]["data"]
                found.append(
                    {"rev": data["rev"], "seed": params["seed"], "value": metrics["value"]}
                )
    return found


def overlaps(a: dict, b: dict) -> bool:
    """Return whether two stage runs ran at the same time."""
    return a["start"] < b["end"] and b["start"] < a["end"]


def check_runs(runs: list[dict[str, Any]], repo: Path, lock_dir: Path) -> tuple[int, int]:
    """Fail when two stage runs wrote one file, shared a workspace or ran on one GPU at once.

    Returns (pairs of runs checked, pairs that ran at the same time).
    """
    locks = os.path.realpath(lock_dir)
    pairs = concurrent = 0
    for i, a in enumerate(runs):
        assert a["cwd"] != os.path.realpath(repo), "a queued experiment ran in the main workspace"
        assert a["gpus"] and a["cuda"] == ",".join(a["gpus"]), a
        own = [w for w in a["writes"] if not w.startswith(locks + os.sep)]
        assert own and all(w.startswith(a["cwd"] + os.sep) for w in own), (
            f"seed {a['seed']} wrote outside its workspace: {own}"
        )
        for b in runs[i + 1 :]:
            pairs += 1
            assert a["cwd"] != b["cwd"], "two experiments ran in one workspace"
            shared = set(a["writes"]) & set(b["writes"])
            # Every stage opens the lock files it tries; it writes only the one it holds.
            files = {w for w in shared if not w.startswith(locks + os.sep)}
            assert not files, f"seeds {a['seed']} and {b['seed']} both wrote {files}"
            if overlaps(a, b):
                concurrent += 1
                assert not set(a["gpus"]) & set(b["gpus"]), "two running stages held one GPU"
    assert concurrent >= 1, "no two stages ran at the same time: the test proved nothing"
    return pairs, concurrent


def run_queue(tmp: Path, seeds: list[int], sleep_s: float) -> dict[str, Any]:
    env = env_for(tmp)
    repo = make_project(tmp, env, sleep_s)
    before = snapshot(repo)
    sh(["dvc", "exp", "run", "--queue", "-S", "seed=" + ",".join(map(str, seeds))], repo, env)
    t0 = time.monotonic()
    start_dvc_queue(repo, env, 2, tmp / "queue-start.log")
    try:
        wait_for_queue(repo, env, len(seeds))
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=env, capture_output=True)
    wall = time.monotonic() - t0

    runs = [json.loads(p.read_text()) for p in sorted((tmp / "runs").glob("run-*.json"))]
    assert sorted(r["seed"] for r in runs) == sorted(seeds), "one stage run per experiment"
    pairs, concurrent = check_runs(runs, repo, tmp / "locks")

    exps = experiments(repo, env)
    assert sorted(e["seed"] for e in exps) == sorted(seeds)
    for e in exps:
        assert e["value"] == 10 * e["seed"], e
        want = {f"part{i}.txt": f"seed {e['seed']} part {i}\n" for i in range(PARTS)}
        assert cached_output(repo, e["rev"]) == want
    assert snapshot(repo) == before, "the queue changed files in the main workspace"
    return {
        "experiments": len(seeds),
        "stage_pairs": pairs,
        "pairs_run_concurrently": concurrent,
        "files_written_per_stage": sorted({len(r["writes"]) for r in runs}),
        "wall_s": round(wall, 1),
    }


def test_two_queue_workers_never_write_the_same_file(tmp_path) -> None:
    stats = run_queue(tmp_path, [1, 2], sleep_s=1.0)
    print(f"\nqueue (short): {stats}")


@pytest.mark.slow
def test_two_queue_workers_never_write_the_same_file_long(tmp_path) -> None:
    stats = run_queue(tmp_path, [1, 2, 3, 4, 5, 6], sleep_s=0.7)
    print(f"\nqueue (long): {stats}")
    assert stats["pairs_run_concurrently"] >= 2


def _run(seed: int, cwd: str, start: float, end: float, gpus: list[str], *writes: str) -> dict:
    return {
        "seed": seed,
        "cwd": cwd,
        "start": start,
        "end": end,
        "gpus": gpus,
        "cuda": ",".join(gpus),
        "writes": [f"{cwd}/out/part0.txt", *writes],
    }


@pytest.mark.parametrize(
    ("planted", "message"),
    [
        ("shared file", "both wrote"),
        ("same workspace", "one workspace"),
        ("same GPU at once", "held one GPU"),
        ("main workspace", "main workspace"),
        ("outside", "outside its workspace"),
        ("serial", "proved nothing"),
    ],
)
def test_queue_check_catches_planted_problems(tmp_path, planted: str, message: str) -> None:
    # The checks above on fabricated stage records: each planted problem must be reported.
    repo, locks = tmp_path / "repo", tmp_path / "locks"
    a = _run(1, "/w/a", 0.0, 2.0, ["0"], f"{locks}/gpu0.lock")
    b = _run(2, "/w/b", 1.0, 3.0, ["1"], f"{locks}/gpu0.lock", f"{locks}/gpu1.lock")
    assert check_runs([a, b], repo, locks) == (1, 1)  # the clean case passes
    if planted == "shared file":  # one workspace nested in the other, one file written twice
        a = _run(1, "/w", 0.0, 2.0, ["0"], "/w/b/out/part0.txt")
    elif planted == "same workspace":
        b = _run(2, "/w/a", 1.0, 3.0, ["1"])
        b["writes"] = ["/w/a/out/other.txt"]
    elif planted == "same GPU at once":
        b["gpus"], b["cuda"] = ["0"], "0"
    elif planted == "main workspace":
        a = _run(1, os.path.realpath(repo), 0.0, 2.0, ["0"])
    elif planted == "outside":
        a["writes"].append("/elsewhere/file.txt")
    else:  # one after the other: nothing was shown about parallel workers
        b["start"], b["end"] = 2.5, 4.0
    with pytest.raises(AssertionError, match=message):
        check_runs([a, b], repo, locks)
