"""llmlab.compare: headline mean and interval across experiments, one plot, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from llmlab.compare import family_table, summarise

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(ROOT / "src"),
        "DVC_NO_ANALYTICS": "1",
        "DVC_GLOBAL_CONFIG_DIR": str(cwd / ".dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(cwd / ".dvc-system"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": str(cwd / ".gitconfig"),
        "GIT_AUTHOR_NAME": "tests",
        "GIT_AUTHOR_EMAIL": "tests@llmlab.invalid",
        "GIT_COMMITTER_NAME": "tests",
        "GIT_COMMITTER_EMAIL": "tests@llmlab.invalid",
    }
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture
def seed_sweep(tmp_path: Path) -> Path:
    """A repository with three tagged runs of persona; preferences ran in the last only."""
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    (repo / "dvc.yaml").write_text(
        "stages:\n  report:\n    cmd: 'true'\n    metrics:\n"
        + "".join(
            f"      - metrics/{f}.json:\n          cache: false\n"
            for f in ("persona", "preferences")
        )
    )
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        assert run(cmd, repo).returncode == 0
    for seed, gap in ((1, 0.3), (2, 0.5), (3, 0.7)):
        persona = {"gap": {"value": gap, "lo": gap - 0.2, "hi": gap + 0.2}, "minimum_met": seed % 2}
        (repo / "metrics/persona.json").write_text(json.dumps(persona))
        if seed == 3:
            (repo / "metrics/preferences.json").write_text(
                json.dumps({"heldout_r": {"value": 0.4}})
            )
        for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", f"seed {seed}"],
                    ["git", "tag", f"seed{seed}"]):  # fmt: skip
            assert run(cmd, repo).returncode == 0
    return repo


def test_compare_prints_mean_interval_and_runs_and_writes_the_plot(seed_sweep: Path) -> None:
    out = run(
        [sys.executable, "-m", "llmlab.compare", "seed1", "seed2", "seed3", "--out", "cmp.png"],
        seed_sweep,
    )
    assert out.returncode == 0, out.stderr
    lo, hi = stats.t.interval(0.95, 2, loc=0.5, scale=stats.sem([0.3, 0.5, 0.7]))
    gap = next(ln for ln in out.stdout.splitlines() if ln.startswith("gap "))
    assert gap.split() == ["gap", "0.5", f"[{lo:.4g},", f"{hi:.4g}]", "0.3", "0.5", "0.7"]
    assert "## persona: 3 of 3 experiments (seed1, seed2, seed3)" in out.stdout
    assert "## preferences: 1 of 3 experiments (seed3)" in out.stdout
    heldout = next(ln for ln in out.stdout.splitlines() if ln.startswith("heldout_r "))
    assert "n/a (one run)" in heldout
    assert (seed_sweep / "cmp.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_experiment_is_a_one_line_error(seed_sweep: Path) -> None:
    out = run([sys.executable, "-m", "llmlab.compare", "seed1", "no-such-run"], seed_sweep)
    assert out.returncode == 1
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("error: no-such-run: neither an experiment nor a git revision")
    )


def test_family_table_uses_values_of_estimates_and_every_scalar() -> None:
    runs = {
        "a": {"gap.value": 0.2, "gap.lo": 0.1, "gap.hi": 0.3, "met": 1},
        "b": {"gap.value": 0.4, "gap.lo": 0.3, "gap.hi": 0.5, "met": 0},
    }
    rows = {r[0]: r for r in family_table(runs, 0.95)}
    assert set(rows) == {"gap", "met"}
    assert rows["gap"][1] == pytest.approx(0.3) and rows["gap"][4] == [0.2, 0.4]
    assert rows["gap"][5] is True and rows["met"][5] is False
    assert summarise([0.5, 0.5], 0.95) == (0.5, 0.5, 0.5)
    mean, lo, hi = summarise([1.0], 0.95)
    assert mean == 1.0 and lo != lo and hi != hi  # NaN: one run has no interval
