"""Sharing across machines: the README's remote and sweep routines, run as written.

An S3 server on loopback (moto, checking signatures), a bare git repository as `origin`, and
clones standing for the machines:

- A, the machine with results: runs the pipeline, then the README's remote set-up block
  (remote with endpointurl, `.dvc/config` committed and pushed, credentials, push).
- B, a GPU machine: the README's "GPU machines and sweeps" block, line by line: clone, set-up,
  credentials, `make pull`, `dvc repro persona_report`, the queued seed sweep (2 seeds on 2
  workers instead of 8 on 8), `dvc exp push --run-cache origin`, `dvc push --run-cache && git push`.
- C, a laptop: the README's clone block, then its laptop block: `make pull`, `dvc exp pull
  origin`, `dvc exp apply <name>` of one of B's experiments.
- D, another machine: restores every stage from the run-cache A pushed after a queued run
  with other params, recomputing nothing that loads a model. DVC's run-cache push moves only
  the run records (`.dvc/cache/runs`), never the outputs they name: A pushes the queued run
  with `dvc exp push --run-cache origin` (its outputs travel with the experiment), and D runs
  with `--pull`, which fetches the records and then each restored stage's outputs.

The blocks are read from README.md and run by bash with `set -e`: any failing command fails
the test. Only placeholders are replaced (bucket, endpoint, credentials, `<repo>`, `<name>`).
Stage commands are replaced by a stand-in that writes every declared output from the params
(the DVC and git behaviour depends on the pipeline's deps, outs and params, not on what a stage
computes; tests/test_remote.py runs the real foundation stages against the same server).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from test_remote import BUCKET, base_env, s3, sh  # noqa: F401  (s3 is a fixture)

ROOT = Path(__file__).resolve().parents[1]
MODEL_LOADING_PARAM = "runtime"

# Writes each output given on the command line from the params file, so that the same params
# give the same bytes on every machine and other params give other bytes.
STAND_IN = """\
import hashlib, json, sys
from pathlib import Path

params = Path("params.yaml").read_bytes()
for out in sys.argv[1:]:
    digest = hashlib.sha256(params + out.encode()).hexdigest()
    path = Path(out)
    if path.suffix:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = [{"step": 0, "digest": digest}] if path.suffix == ".json" else digest
        path.write_text(json.dumps(body) if path.suffix == ".json" else body)
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / "part.txt").write_text(digest)
"""


def readme_blocks(section: str) -> list[str]:
    """Return the bash code blocks of one `## section` of README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end > 0 else None]
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def run_block(block: str, cwd: Path, env: dict[str, str], subst: dict[str, str]) -> str:
    """Run a README block in one bash (so `cd` carries), stopping at the first failure."""
    for placeholder, value in subst.items():
        block = block.replace(placeholder, value)
    code = "\n".join(line.split(" # ")[0] for line in block.splitlines())
    left = re.findall(r"<[a-z]+>|\.\.\.", code)
    assert not left, f"README placeholders without a test value: {left}\n{block}"
    script = "set -euo pipefail\nset -x\n" + block
    return sh(["bash", "-c", script], cwd, env, timeout=1200).stdout


def stand_in_pipeline() -> dict:
    """Return the project's dvc.yaml with each stage command replaced by the stand-in.

    The stand-in writes each declared output, and inside a directory output the paths that
    other stages read from it.
    """
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    read: set[str] = set()
    for stage in spec["stages"].values():
        variants = stage.get("matrix", {}).get("variant", [None])
        for dep in stage.get("deps", []):
            read |= {dep.replace("${item.variant}", str(v)) for v in variants}
    for stage in spec["stages"].values():
        outs = [
            next(iter(o)) if isinstance(o, dict) else o
            for kind in ("outs", "metrics", "plots")
            for o in stage.get(kind, [])
        ]
        inner = sorted(r for r in read for o in outs if "${" not in o and r.startswith(o + "/"))
        stage["cmd"] = f"python stand_in.py {' '.join(outs + inner)}"
    spec.pop("plots", None)  # the stand-in's series have none of the plotted fields
    return spec


def shipped_inputs(spec: dict) -> set[str]:
    """Return the deps of the pipeline that no stage writes (the shipped data and code)."""
    outs, deps = set(), set()
    for stage in spec["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            outs |= {next(iter(o)) if isinstance(o, dict) else o for o in stage.get(kind, [])}
        deps |= set(stage.get("deps", []))
    written = {o.split("${")[0].rstrip("/") for o in outs}
    return {
        d
        for d in deps
        if "${" not in d and not any(d == w or d.startswith(w + "/") for w in written)
    }


@pytest.fixture(scope="module")
def world(s3, tmp_path_factory):  # noqa: F811
    """Return the machines' directories and environments around one bare `origin`."""
    top = tmp_path_factory.mktemp("sharing")
    home = top / "home"
    home.mkdir()
    # The README's `make setup` must find an installed virtualenv: a stand-in whose marker
    # is newer than any clone, pointing at this interpreter's bin directory.
    venv = top / "venv"
    venv.mkdir()
    real = Path(sys.prefix)
    for part in ("bin", "lib", "include"):
        (venv / part).symlink_to(real / part)
    shutil.copy(real / "pyvenv.cfg", venv / "pyvenv.cfg")
    (venv / ".installed").touch()
    os.utime(venv / ".installed", (4102444800, 4102444800))  # 2100-01-01
    origin = top / "origin.git"
    env = base_env(top, home)
    env["VENV"] = str(venv)
    env["PYTHONPATH"] = "src"  # each clone's own code, wherever the routine cd's to
    env["AWS_REQUEST_CHECKSUM_CALCULATION"] = "when_required"
    sh(["git", "init", "-q", "--bare", "-b", "main", str(origin)], top, env)

    a = top / "a" / "llmlab"
    a.mkdir(parents=True)
    spec = stand_in_pipeline()
    for rel in sorted(shipped_inputs(spec) | {"src", "configs"}):  # configs: the presets
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, a / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (a / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, a / rel)
    for name in ("Makefile", "pyproject.toml", "requirements.lock", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, a / name)
    (a / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (a / "stand_in.py").write_text(STAND_IN)
    sh(["git", "init", "-q", "-b", "main"], a, env)
    sh(["dvc", "init", "-q"], a, env)
    shutil.copy(ROOT / ".dvc" / "config", a / ".dvc" / "config")  # the shipped local remote
    # `make setup` must not reinstall anything into the interpreter the tests run on.
    dry = sh(["make", "-n", "setup"], a, env).stdout.strip()
    assert dry == "make: Nothing to be done for 'setup'.", f"make setup would build: {dry}"
    sh(["dvc", "repro"], a, env, timeout=1200)
    sh(["git", "add", "-A"], a, env)
    sh(["git", "commit", "-q", "-m", "pipeline run"], a, env)
    sh(["git", "remote", "add", "origin", str(origin)], a, env)
    sh(["git", "push", "-q", "-u", "origin", "main"], a, env)
    subst = {
        "s3://my-bucket/llmlab": f"s3://{BUCKET}/llmlab",
        "https://s3.example.com": s3["endpoint"],
        "access_key_id ...": f"access_key_id {s3['key']}",
        "secret_access_key ...": f"secret_access_key {s3['secret']}",
        "<repo>": str(origin),
        # The sweep as written, at 2 seeds on 2 workers: the 2-core test machine would take
        # about 20 minutes for 8 experiments on 8 workers.
        "persona.train.seed=1,2,3,4,5,6,7,8": "persona.train.seed=1,2",
        "--run-all -j 8": "--run-all -j 2",
    }
    return {"top": top, "a": a, "env": env, "subst": subst, "origin": origin}


def set_dotted(tree: dict, dotted: str, value: object) -> None:
    """Set the value at a dotted params path of a nested mapping, as `-S key=value` does."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree[part]
    tree[leaf] = value


def stage_log(output: str) -> tuple[set[str], set[str], set[str]]:
    """Return (stages run, restored from the run-cache, unchanged) in a `dvc repro`/`exp` log.

    `output` is stdout and stderr together: which stream DVC's logger writes is not part of
    its interface.
    """
    ran = set(re.findall(r"Running stage '([^']+)'", output))
    restored = set(re.findall(r"Stage '([^']+)' is cached - skipping run", output))
    unchanged = set(re.findall(r"Stage '([^']+)' didn't change, skipping", output))
    return ran, restored, unchanged


def stage_names(repo: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(os.fspath(repo)) as r:
        return {s.name for s in r.index.stages}  # addressing is relative to the cwd


def model_loading_stages(repo: Path) -> set[str]:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(os.fspath(repo)) as r:
        return {
            s.name
            for s in r.index.stages
            if any(
                MODEL_LOADING_PARAM in d.params for d in s.deps if isinstance(d, ParamsDependency)
            )
        }


@pytest.mark.slow
def test_readme_routines_share_results_sweeps_and_run_cache(world) -> None:
    env, subst, top = world["env"], world["subst"], world["top"]
    setup, clone = readme_blocks("Remote storage")
    gpu, laptop = readme_blocks("GPU machines and sweeps")

    # A: the remote set-up, as written; the remote (with endpointurl) is committed and pushed.
    run_block(setup, world["a"], env, subst)
    committed = sh(["git", "show", "origin/main:.dvc/config"], world["a"], env).stdout
    assert f"s3://{BUCKET}/llmlab" in committed and subst["https://s3.example.com"] in committed
    assert "secret" not in committed.replace("secret_access_key", "")

    # B: the GPU-machine routine, as written.
    b = top / "b"
    b.mkdir()
    log = run_block(gpu, b, env, subst)
    assert "pulling from DVC remote 's3' (s3://" in log
    b_repo = b / "llmlab"
    names = sh(["dvc", "exp", "list", "--name-only"], b_repo, env).stdout.split()
    assert len(names) == 2, names

    # C: a laptop clones, pulls, fetches B's experiments and applies one.
    c = top / "c"
    c.mkdir()
    run_block(clone, c, env, subst)
    c_repo = c / "llmlab"
    params_before = (c_repo / "params.yaml").read_text()
    run_block(laptop, c_repo, env, subst | {"<name>": names[0]})
    seed = yaml.safe_load((c_repo / "params.yaml").read_text())["persona"]["train"]["seed"]
    assert seed in (1, 2)
    # The sweep ran up to persona_report: that chain is current; only the cross-family
    # `report` page, which the sweep did not target, waits for a `dvc repro`.
    assert sh(["dvc", "status", "persona_report"], c_repo, env).stdout.strip() == (
        "Data and pipelines are up to date."
    )
    # Comments and key order of params.yaml survive `-S` and `exp apply`.
    comments = [ln.strip() for ln in params_before.splitlines() if ln.strip().startswith("#")]
    after = (c_repo / "params.yaml").read_text()
    assert [ln.strip() for ln in after.splitlines() if ln.strip().startswith("#")] == comments
    # Values: params.yaml with the README's preset (dotted keys, leaves only) and the seed.
    before_tree, after_tree = yaml.safe_load(params_before), yaml.safe_load(after)
    assert list(before_tree) == list(after_tree)
    preset = re.search(r"python -m llmlab\.preset (\S+)", gpu).group(1)
    expected = before_tree
    for dotted, value in yaml.safe_load((c_repo / preset).read_text()).items():
        set_dotted(expected, dotted, value)
    set_dotted(expected, "persona.train.seed", seed)
    assert after_tree == expected


@pytest.mark.slow
def test_every_model_loading_stage_restores_from_a_pushed_run_cache(world) -> None:
    env, subst, top, a = world["env"], world["subst"], world["top"], world["a"]
    setup, clone = readme_blocks("Remote storage")
    if not (a / ".dvc" / "config.local").exists():
        run_block(setup, a, env, subst)
    # A: a queued run with other params on every stage, run by a queue worker, then pushed
    # as the README pushes a sweep. `dvc push --run-cache` would push the run records but not
    # the queued run's outputs (they are in no workspace), and D could restore nothing.
    sh(["dvc", "exp", "run", "--queue", "-S", "model=gemma3-270m"], a, env)
    sh(["dvc", "exp", "run", "--run-all", "-j", "1"], a, env, timeout=1200)
    sh(["dvc", "exp", "push", "--run-cache", "origin"], a, env, timeout=600)
    # D: a fresh clone, the README's clone block, then the same params in the workspace.
    d = top / "d"
    d.mkdir()
    run_block(clone, d, env, subst)
    d_repo = d / "llmlab"
    cmd = ["dvc", "exp", "run", "--pull", "-S", "model=gemma3-270m"]
    proc = sh(cmd, d_repo, env, timeout=1200)
    log = proc.stdout + proc.stderr
    ran, restored, unchanged = stage_log(log)
    costly = model_loading_stages(d_repo)
    stages = stage_names(d_repo)
    print(
        f"\nrestored from the pushed run-cache on D: {len(restored)} of {len(stages)} stages "
        f"({len(ran)} run, {len(unchanged)} unchanged); model-loading: {len(costly & restored)} of {len(costly)}; "
        f"run: {sorted(ran)}"
    )
    unaccounted = stages - ran - restored - unchanged
    assert not unaccounted, f"stages the log does not name: {sorted(unaccounted)}\n{log[-3000:]}"
    sanity = {"inoculation_smoke"}  # see tests/test_dvc_deps.py SANITY_CHECKS
    # A model-loading stage whose params the sweep does not touch (persona_candidates with its
    # judge off) is already up to date on D: neither restored nor recomputed, which is the goal.
    assert not (costly - sanity) & ran, f"model-loading stages recomputed on D: {sorted(ran)}"
    missed = (costly - sanity) - restored - unchanged
    assert not missed, f"model-loading stages not restored on D: {sorted(missed)}\n{log[-3000:]}"
    metrics = json.loads((d_repo / "metrics" / "persona.json").read_text())
    assert metrics  # the restored stage's git-tracked metric is back in the workspace


@pytest.mark.slow
def test_make_pull_takes_about_as_long_as_dvc_pull(world) -> None:
    """Figures only (no assertion on time): `make pull` against a plain `dvc pull`."""
    import time

    env, subst, top, a = world["env"], world["subst"], world["top"], world["a"]
    setup, _ = readme_blocks("Remote storage")
    if not (a / ".dvc" / "config.local").exists():
        run_block(setup, a, env, subst)
    seconds = {}
    for name, cmd in (("make pull", ["make", "pull"]), ("dvc pull", ["dvc", "pull"])):
        repo = top / name.replace(" ", "_") / "llmlab"
        sh(["git", "clone", "-q", subst["<repo>"], str(repo)], top, env)
        for option in ("access_key_id", "secret_access_key"):
            value = subst[f"{option} ..."].split()[1]
            sh(["dvc", "remote", "modify", "--local", "s3", option, value], repo, env)
        start = time.perf_counter()
        sh(cmd, repo, env, timeout=900)
        seconds[name] = time.perf_counter() - start
        assert sh(["dvc", "status", "--json"], repo, env).stdout.strip() in ("{}", "")
    print(f"\nmake pull {seconds['make pull']:.1f} s, dvc pull {seconds['dvc pull']:.1f} s")
