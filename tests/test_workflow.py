"""The research workflow's contract with DVC, checked on the project's own dvc.yaml and params.

- every family's headline metrics file is a declared metric (so `dvc exp show` has its columns)
  and `dvc exp show --csv` parses;
- every top-level plot has a title and axis labels and draws files that git carries;
- a change to one family's params reaches only that family's stages (and the `report` page),
  by DVC's own params resolution and by `dvc status` against the committed dvc.lock.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("foundation", "persona", "preferences", "introspection", "inoculation")
SHARED_PARAMS = ("model", "models", "runtime", "judge", "seed")


def spec() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def out_entries(stage: dict, kind: str) -> dict[str, dict]:
    """Return {path: options} of a stage's `outs`, `metrics` or `plots` list."""
    result: dict[str, dict] = {}
    for entry in stage.get(kind, []):
        if isinstance(entry, str):
            result[entry] = {}
        else:
            ((path, opts),) = entry.items()
            result[path] = opts or {}
    return result


def family_of(stage_name: str) -> str:
    """Return the family a stage belongs to: its name's prefix (`report` is its own)."""
    return stage_name.split("_", 1)[0]


def env_for(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_GLOBAL_CONFIG_DIR"] = str(cwd / ".dvc-global")
    env["DVC_SYSTEM_CONFIG_DIR"] = str(cwd / ".dvc-system")
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env["GIT_CONFIG_GLOBAL"] = str(cwd / ".gitconfig")
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"] = "llmlab tests"
        env[f"GIT_{role}_EMAIL"] = "tests@llmlab.invalid"
    return env


def sh(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env_for(cwd), capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr}")
    return proc.stdout


# ---------------------------------------------------------------- metrics and exp show columns


def test_each_family_metrics_file_is_a_declared_git_metric() -> None:
    stages = spec()["stages"]
    declared = {
        path: (name, opts)
        for name, stage in stages.items()
        for path, opts in out_entries(stage, "metrics").items()
    }
    for family in FAMILIES:
        path = f"metrics/{family}.json"
        assert path in declared, f"{path} is not a stage metric: dvc exp show would not show it"
        stage, opts = declared[path]
        assert family_of(stage) == family, f"{path} is written by {stage}"
        # cache: false keeps it in git, so every experiment commit carries its numbers.
        assert opts.get("cache") is False, f"{path} must be cache: false"
    # Every metrics JSON the families write is declared (none silently missing from exp show).
    on_disk = {f"metrics/{p.name}" for p in (ROOT / "metrics").glob("*.json")}
    assert on_disk <= set(declared), f"undeclared metrics files: {on_disk - set(declared)}"


def test_report_stage_reads_every_family_metric_and_declares_what_it_reads() -> None:
    report = spec()["stages"]["report"]
    deps = set(report["deps"])
    params = set(report["params"])
    for family in FAMILIES:
        assert f"metrics/{family}.json" in deps
        # The page prints each family's params section: it must re-run when they change.
        assert family in params, f"report shows {family} params but does not declare them"
    # Git-tracked (not cached) and persisted, so a failed repro leaves the last page in place.
    assert out_entries(report, "outs") == {"metrics/report.md": {"cache": False, "persist": True}}


def test_exp_show_csv_has_every_family_and_the_params(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    present = [f for f in FAMILIES if (ROOT / "metrics" / f"{f}.json").is_file()]
    assert "foundation" in present
    (repo / "metrics").mkdir()
    for family in present:
        shutil.copy(ROOT / "metrics" / f"{family}.json", repo / "metrics" / f"{family}.json")
    sh(["git", "init", "-q", "-b", "main"], repo)
    sh(["dvc", "init", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "metrics"], repo)

    rows = list(csv.DictReader(io.StringIO(sh(["dvc", "exp", "show", "--csv"], repo))))
    assert [r["rev"] for r in rows] == ["workspace", "main"]
    columns = set(rows[0])
    # Params are columns (the swept ones are what a sweep varies).
    assert {"foundation.seed", "persona.train.seed"} <= columns
    assert rows[1]["foundation.seed"] == str(
        yaml.safe_load((ROOT / "params.yaml").read_text())["foundation"]["seed"]
    )

    # Each family's metrics are columns, with the values of its file.
    def column(family: str, key: str) -> str:
        return key if key in columns else f"metrics/{family}.json:{key}"

    foundation = json.loads((ROOT / "metrics/foundation.json").read_text())
    col = column("foundation", "best_probe_accuracy")
    assert float(rows[1][col]) == pytest.approx(foundation["best_probe_accuracy"])
    for family in present:
        leaves = flat(json.loads((ROOT / "metrics" / f"{family}.json").read_text()))
        numeric = [k for k, v in leaves.items() if isinstance(v, int | float)]
        assert numeric, f"metrics/{family}.json has no numbers"
        shown = [k for k in numeric if column(family, k) in columns]
        assert len(shown) == len(numeric), f"{family}: {sorted(set(numeric) - set(shown))[:5]}"

    # The headline view documented in docs/workflow.md has columns of every family it names.
    doc = (ROOT / "docs/workflow.md").read_text()
    start = doc.index("dvc exp show --drop '.*' --keep '") + len(
        "dvc exp show --drop '.*' --keep '"
    )
    keep = doc[start : doc.index("'", start)]
    out = sh(["dvc", "exp", "show", "--csv", "--drop", ".*", "--keep", keep], repo)
    headline = next(csv.reader(io.StringIO(out)))
    assert "model" in headline and "foundation.seed" in headline
    for family in present:
        if family == "introspection":
            continue  # no headline keys named yet
        leaves = flat(json.loads((ROOT / "metrics" / f"{family}.json").read_text()))
        shown = [c for c in headline if c in leaves or c.startswith(f"metrics/{family}.json:")]
        assert shown, f"the documented headline view shows nothing of {family}"


def flat(tree: object, prefix: str = "") -> dict[str, object]:
    """Return the leaves of a JSON tree under dotted keys, as `dvc exp show` names them."""
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for k, v in tree.items():
            out |= flat(v, f"{prefix}{k}.")
        return out
    if isinstance(tree, list):
        return {}  # lists are not metric columns
    return {prefix[:-1]: tree}


def test_every_cached_output_is_pushed_as_the_readme_says() -> None:
    from dvc.repo import Repo

    with Repo(os.fspath(ROOT)) as r:
        unpushed = sorted(o.def_path for o in r.index.outs if o.use_cache and not o.can_push)
    assert not unpushed, f"push: false outputs break run-cache restores elsewhere: {unpushed}"
    readme = (ROOT / "README.md").read_text()
    assert "Every cached\noutput is pushed, the activation arrays included" in readme


def test_pull_is_one_dvc_pull_from_a_named_remote() -> None:
    from llmlab.pull import pull_command, remote_of

    name, url = remote_of(ROOT, None)
    assert name == "local" and url.endswith("llmlab-dvc-remote")
    assert pull_command("s3", None, ["-j", "8"])[3:] == [
        "pull",
        "--run-cache",
        "-r",
        "s3",
        "-j",
        "8",
    ]
    # One family: its stages by one glob each, still one call.
    assert pull_command("s3", ["persona"], [])[-2:] == ["--glob", "persona_*"]


# ---------------------------------------------------------------- plots


def test_top_level_plots_have_titles_labels_and_series_that_stages_write() -> None:
    from dvc.repo import Repo

    d = spec()
    with Repo(os.fspath(ROOT)) as r:
        produced = {o.def_path for o in r.index.outs}
    plots = d["plots"]
    assert plots
    drawn: set[str] = set()
    for entry in plots:
        ((name, props),) = entry.items()
        for key in ("template", "x", "y", "title", "x_label", "y_label"):
            assert props.get(key), f"plot {name!r} has no {key}"
        assert isinstance(props["y"], dict), f"plot {name!r}: y must map files to fields"
        for path, fields in props["y"].items():
            # A stage writes it: in git (cache: false) for the results, or inside a cached
            # output (live training curves, restorable from the run-cache with their stage).
            written = any(path == o or path.startswith(f"{o}/") for o in produced)
            assert written, f"plot {name!r} draws {path}, which no stage writes"
            assert fields, f"plot {name!r}: no fields of {path}"
            drawn.add(path.split("/")[1])
    # Each family with a plots/ directory has at least one titled plot.
    for family in FAMILIES:
        if family != "introspection":  # its series appear once its stages have run
            assert family in drawn, f"no top-level plot for {family}"


def test_foundation_series_fields_exist_in_the_committed_file() -> None:
    series = json.loads((ROOT / "plots/foundation/layers.json").read_text())
    rows = series if isinstance(series, list) else next(iter(series.values()))
    for entry in spec()["plots"]:
        ((name, props),) = entry.items()
        for path, fields in props["y"].items():
            if path == "plots/foundation/layers.json":
                assert all({props["x"], *fields} <= set(r) for r in rows), name


# ---------------------------------------------------------------- params isolation


def params_leaves(section: object, prefix: str) -> list[str]:
    """Return one dotted leaf key per second-level subsection of a params section."""
    if not isinstance(section, dict):
        return [prefix]
    keys = []
    for k, v in section.items():
        inner = v
        path = f"{prefix}.{k}"
        while isinstance(inner, dict) and inner:
            first = next(iter(inner))
            path, inner = f"{path}.{first}", inner[first]
        if not isinstance(inner, dict):
            keys.append(path)
    return keys


def changed_value(value: object) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, list):
        return [*value, value[-1]] if value else [0]
    return "changed"


def set_leaf(params: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    node = params
    for p in parents:
        node = node[p]
    node[last] = changed_value(node[last])


def pipeline(repo: Path) -> tuple[list, dict[str, list[str]], dict[str, list[str]]]:
    """Return ([(stage, params dependency)], {stage: outs}, {stage: deps}), resolved by DVC."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    params, outs, deps = [], {}, {}
    with Repo(os.fspath(repo)) as r:
        for stage in r.index.stages:
            params += [(stage.name, d) for d in stage.deps if isinstance(d, ParamsDependency)]
            outs[stage.name] = [o.def_path for o in stage.outs]
            deps[stage.name] = [
                d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)
            ]
    return params, outs, deps


def lookup(params: dict, dotted: str) -> object:
    node: object = params
    for part in dotted.split("."):
        node = node.get(part, "<absent>") if isinstance(node, dict) else "<absent>"
    return node


def values(declared: list, params: dict) -> dict[str, list]:
    """Return {stage: values of the params keys it declares (DVC's list) in `params`}."""
    result: dict[str, list] = {}
    for stage, dep in declared:
        keys = list(dep.params) or [""]
        result.setdefault(stage, []).append({k: lookup(params, k) if k else params for k in keys})
    return result


def downstream(touched: set[str], outs: dict, deps: dict) -> set[str]:
    """Return `touched` and every stage that reads, directly or not, one of their outputs."""
    result = set(touched)
    grew = True
    while grew:
        grew = False
        produced = [o for t in result for o in outs[t]]
        for name, paths in deps.items():
            if name not in result and any(
                p == o or p.startswith(o + "/") or o.startswith(p + "/")
                for p in paths
                for o in produced
            ):
                result.add(name)
                grew = True
    return result


@pytest.fixture(scope="module")
def params_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("params") / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    sh(["dvc", "init", "--no-scm", "-q"], repo)
    return repo


def test_every_stage_declares_only_its_familys_params() -> None:
    for name, stage in spec()["stages"].items():
        body = stage.get("do", stage)
        family = family_of(name)
        for param in body.get("params", []):
            key = param if isinstance(param, str) else next(iter(param))
            top = key.split(".", 1)[0]
            if name == "report":
                assert top in (*SHARED_PARAMS, *FAMILIES), key
            else:
                assert top in (*SHARED_PARAMS, family), f"{name} declares {key}"


def test_a_family_param_change_reaches_only_that_family(params_repo: Path) -> None:
    params = yaml.safe_load((params_repo / "params.yaml").read_text())
    declared, outs, deps = pipeline(params_repo)
    base = values(declared, params)
    assert len(base) > 20
    checked = 0
    for family in FAMILIES:
        for leaf in params_leaves(params[family], family):
            changed = yaml.safe_load((ROOT / "params.yaml").read_text())
            set_leaf(changed, leaf)
            now = values(declared, changed)
            touched = {s for s in base if base[s] != now.get(s)}
            assert touched, f"no stage declares {leaf}"
            reached = downstream(touched, outs, deps)
            others = {s for s in reached if family_of(s) not in (family, "report")}
            assert not others, f"-S {leaf}=... would re-run {sorted(others)}"
            checked += 1
    assert checked >= 10


def test_dvc_status_sees_a_foundation_seed_change_in_foundation_stages_only(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "dvc.lock", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    sh(["dvc", "init", "--no-scm", "-q"], repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {"foundation_capture", "foundation_report"} <= set(lock)

    def params_changes() -> dict[str, dict]:
        report = json.loads(sh(["dvc", "status", "--json"], repo) or "{}")
        result = {}
        for stage, entries in report.items():
            for entry in entries:
                if isinstance(entry, dict) and "params.yaml" in entry.get("changed deps", {}):
                    result[stage] = entry["changed deps"]["params.yaml"]
        return result

    before = params_changes()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["foundation"]["seed"] = (
        lock["foundation_capture"]["params"]["params.yaml"]["foundation"]["seed"] + 7
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    after = params_changes()
    newly = {s for s in after if after[s] != before.get(s)}
    # The cross-family `report` stage declares every family's params (it prints them), so it
    # sees the change too once dvc.lock records it; no other family's stage may.
    assert newly - {"report"} == {"foundation_capture", "foundation_report"}
    assert all(after[s] == {"foundation": "modified"} for s in newly)


def test_dvc_status_agrees_for_one_param_of_every_family(params_repo: Path, tmp_path: Path) -> None:
    declared, outs, deps = pipeline(params_repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    base = values(declared, params)
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "dvc.lock", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    sh(["dvc", "init", "--no-scm", "-q"], repo)
    locked = set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"])

    def params_changed() -> set[str]:
        report = json.loads(sh(["dvc", "status", "--json"], repo) or "{}")
        return {
            stage
            for stage, entries in report.items()
            for e in entries
            if isinstance(e, dict) and "params.yaml" in e.get("changed deps", {})
        }

    before = params_changed()
    checked = []
    for family in FAMILIES:
        for leaf in params_leaves(params[family], family):
            changed = yaml.safe_load((ROOT / "params.yaml").read_text())
            set_leaf(changed, leaf)
            now = values(declared, changed)
            expected = {s for s in base if base[s] != now[s]} & locked - before
            if expected:
                break
        else:
            continue  # none of this family's stages has run yet
        (repo / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
        newly = params_changed() - before
        assert newly == expected, f"-S {leaf}: dvc status {sorted(newly)}, expected {expected}"
        assert {family_of(s) for s in newly} <= {family, "report"}
        checked.append(leaf)
    assert len(checked) >= 3, checked


def test_dvc_plots_show_loads_every_plot(tmp_path: Path) -> None:
    """`dvc plots show` draws every plot whose data this workspace holds; none "failed to load".

    A plot fails to load when a stage declares a series it did not write (or has not run
    since it was declared): the failure names those files. The one legitimate gap is a
    series inside a cached stage out that this checkout has not pulled (a fresh clone before
    `make pull`): such a source must lie under an out that dvc.lock records and that is
    absent from the workspace; anything else is a failure.
    """
    proc = subprocess.run(
        ["dvc", "plots", "show", "--json"],
        cwd=ROOT,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = json.loads(proc.stdout)
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    cached_outs = {
        out["path"]
        for stage in lock.values()
        for out in stage.get("outs", [])
        if out.get("cache", True)
    }

    def not_pulled(source: str) -> bool:
        return any(
            (source == out or source.startswith(out.rstrip("/") + "/"))
            and not (ROOT / out).exists()
            for out in cached_outs
        )

    errors = shown.get("errors") or []
    unexplained = sorted({e["source"] for e in errors if not not_pulled(e.get("source", ""))})
    assert not unexplained, f"dvc plots show: failed to load {unexplained}"
    drawn = [name for name, data in shown["data"].items() if data]
    # Every family draws plots from files git holds, so a clean checkout still draws many.
    assert len(drawn) >= 20, f"only {len(drawn)} plots drawn: {drawn}"
