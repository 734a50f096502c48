"""Headline metrics: few numbers per family, all numeric, so `dvc exp show` stays readable.

Checked on the committed metrics files through `dvc exp show --csv` itself, and on each family's
headline function applied to a synthetic results tree (the stage outputs are not needed).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from llmlab.headline import MAX_LEAVES, clean, estimate, leaves, write_headline
from llmlab.io import DataError

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("foundation", "persona", "preferences", "introspection", "inoculation")
# Experiment, rev, typ, Created, parent: the columns `dvc exp show --csv` always has.
FIXED_COLUMNS = 5


def dvc_env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env |= {
        "DVC_NO_ANALYTICS": "1",
        "DVC_GLOBAL_CONFIG_DIR": str(cwd / ".dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(cwd / ".dvc-system"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": str(cwd / ".gitconfig"),
    }
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"] = "tests"
        env[f"GIT_{role}_EMAIL"] = "tests@llmlab.invalid"
    return env


def sh(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=dvc_env(cwd), capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stderr[-2000:]}"
    return proc.stdout


def metric_leaves(family: str) -> dict[str, object]:
    return leaves(json.loads((ROOT / "metrics" / f"{family}.json").read_text()))


@pytest.mark.parametrize("family", FAMILIES)
def test_committed_headline_is_few_numbers(family: str) -> None:
    values = metric_leaves(family)
    assert 0 < len(values) <= MAX_LEAVES, f"metrics/{family}.json: {len(values)} numbers"
    bad = {k: v for k, v in values.items() if not isinstance(v, int | float)}
    assert not bad, f"metrics/{family}.json: not numbers: {bad}"
    # Every interval is whole and ordered.
    for key in values:
        if key.endswith(".lo"):
            stem = key[: -len(".lo")]
            assert values[f"{stem}.lo"] <= values[f"{stem}.value"] <= values[f"{stem}.hi"], stem


def exp_show_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for family in FAMILIES:
        shutil.copy(ROOT / "metrics" / f"{family}.json", repo / "metrics" / f"{family}.json")
    sh(["git", "init", "-q", "-b", "main"], repo)
    sh(["dvc", "init", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "metrics"], repo)
    return repo


def csv_rows(repo: Path, *args: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(sh(["dvc", "exp", "show", "--csv", *args], repo))))


def test_exp_show_metric_columns_are_bounded_and_numeric(tmp_path: Path) -> None:
    repo = exp_show_repo(tmp_path)
    rows = csv_rows(repo)
    columns = list(rows[0])
    leaves = {f: metric_leaves(f) for f in FAMILIES}
    counts = Counter(k for keys in leaves.values() for k in keys)
    # exp show prefixes a key two metrics files share with its file (e.g. the judge coverage
    # count of persona and introspection); every other key is its own column.
    expected = {
        k if counts[k] == 1 else f"metrics/{f}.json:{k}" for f, keys in leaves.items() for k in keys
    }
    metric_columns = [c for c in columns if c in expected]
    assert set(metric_columns) == expected
    assert len(metric_columns) <= MAX_LEAVES * len(FAMILIES)
    for row in rows:
        for c in metric_columns:
            float(row[c])  # a string metric would be a ValueError naming it

    # After a sweep that moved the metrics and one seed, `--only-changed` keeps the headline, the
    # swept param and nothing else: narrow enough for a wide terminal.
    for family in FAMILIES:
        path = repo / "metrics" / f"{family}.json"
        shifted = json.loads(path.read_text(), parse_float=lambda s: float(s) + 0.5)
        path.write_text(json.dumps(shifted))
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("seed: 0", "seed: 1", 1))
    changed = list(csv_rows(repo, "--only-changed")[0])
    assert len(changed) <= FIXED_COLUMNS + len(expected) + 1, changed
    floats = {k for f in FAMILIES for k, v in metric_leaves(f).items() if isinstance(v, float)}
    assert floats <= set(changed)


def test_clean_rejects_a_string_and_drops_absent_values(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"m\.json:b: headline verdict is 'null', not a number"):
        clean({"a": 1.0, "b": {"verdict": "null"}}, "m.json")
    out = clean({"met": True, "kl": None, "x": {"y": None}, "r": 0.123456, "n": 3}, "m.json")
    assert out == {"met": 1, "r": 0.1235, "n": 3}
    assert estimate({"r": 0.5, "lo": 0.1, "hi": 0.9, "p": 0.01}, "r") == {
        "value": 0.5,
        "lo": 0.1,
        "hi": 0.9,
    }
    assert estimate({"value": None, "lo": None, "hi": None}) is None
    too_many = {f"k{i}": float(i) for i in range(MAX_LEAVES + 1)}
    with pytest.raises(DataError, match=f"{MAX_LEAVES + 1} headline numbers"):
        write_headline(tmp_path / "m.json", too_many)
    assert not (tmp_path / "m.json").exists()


def results_tree(family: str) -> dict:
    """Return the results tree of the committed run when the lead has regenerated it."""
    path = ROOT / "data" / family / "results.json"
    if not path.is_file():
        pytest.skip(f"{path.relative_to(ROOT)} is not in this checkout")
    return json.loads(path.read_text())


@pytest.mark.parametrize("family", ("persona", "preferences", "introspection", "inoculation"))
def test_headline_of_a_results_tree_matches_the_metrics_file(family: str) -> None:
    module = __import__(f"llmlab.{family}.report", fromlist=["headline"])
    headline = clean(module.headline(results_tree(family)), family)
    assert leaves(headline) == metric_leaves(family)


def test_introspection_headline_of_a_partial_run_leaves_out_what_was_not_run() -> None:
    from llmlab.introspection.report import headline

    est = {"value": 0.7, "lo": 0.5, "hi": 0.8, "n_obs": 40}
    tree = {
        "b1_detection": {"original": {"in_distribution": {"accuracy": est}}},
        "success": [{"met": True}, {"met": None}, {"met": False}],
    }
    out = clean(headline(tree), "introspection")
    assert out == {
        "b1_original_in_distribution": {"value": 0.7, "lo": 0.5, "hi": 0.8},
        "success_met": 1,
        "success_assessable": 2,
    }
