"""DVC knows everything a result depends on.

- Every stage depends on exactly the source files its entry module runs: the module and, through
  every `import` it or the core executes, the rest of `src/llmlab` (its import closure, read from
  the syntax tree; imports inside functions count, `if TYPE_CHECKING:` blocks do not).
- The code hashes recorded in dvc.lock equal the files, so a clean checkout is up to date.
- Every stage that loads a model (GPU time on real models) can be restored from a pushed
  run-cache: DVC writes run-cache entries only for stages whose outputs are all cached, or
  metrics or plots, none `persist`, and another machine can restore them only if all are pushed.
- The results kept in git (`cache: false`) of the other stages survive a failed `dvc repro`.

Regenerate the source deps of dvc.yaml after an import changed:

    .venv/bin/python tests/test_dvc_deps.py
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "llmlab"


def module_file(module: str) -> Path | None:
    """Return the source file of a module of the project (`llmlab.x.y`), or None."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, module: str) -> set[str]:
    """Return the modules a source file imports when it runs (at any depth of its code)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and is_type_checking(node):
            todo.extend(node.orelse)  # the TYPE_CHECKING body never runs
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            found.add(base)
            # `from llmlab import stats` imports the module llmlab.stats.
            found |= {f"{base}.{alias.name}" for alias in node.names}
        todo.extend(ast.iter_child_nodes(node))
    return found


def import_closure(entry: str) -> set[str]:
    """Return the repository paths of every project file that running `entry` imports."""
    files: set[str] = set()
    seen: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        path = module_file(module)
        if path is None:
            continue
        files.add(path.relative_to(ROOT).as_posix())
        todo.extend(imported_modules(path, module))
    return files


def entry_module(cmd: str) -> str:
    match = re.match(r"python -m ([\w.]+)", cmd)
    assert match, f"dvc.yaml: stage command {cmd!r} is not `python -m <module>`"
    return match.group(1)


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def code_deps(stage: dict) -> list[str]:
    return [d for d in stage.get("deps", []) if d.startswith("src/")]


def test_every_stage_depends_on_exactly_its_import_closure() -> None:
    missing: dict[str, list[str]] = {}  # file -> stages that run it without depending on it
    extra: dict[str, list[str]] = {}  # file -> stages that depend on it without running it
    for name, stage in stages().items():
        closure = import_closure(entry_module(stage["cmd"]))
        declared = set(code_deps(stage))
        for path in closure - declared:
            missing.setdefault(path, []).append(name)
        for path in declared - closure:
            extra.setdefault(path, []).append(name)
    problems = [f"{p} is imported by {s} but not a dep" for p, s in sorted(missing.items())]
    problems += [f"{p} is a dep of {s} but never imported" for p, s in sorted(extra.items())]
    assert not problems, (
        "dvc.yaml: " + "; ".join(problems) + " (regenerate: python tests/test_dvc_deps.py)"
    )


def test_closure_follows_the_core_and_lazy_imports() -> None:
    closure = import_closure("llmlab.persona.train")
    # Through the core (training -> models -> params, chat), package __init__ files included.
    for path in ("training", "models", "params", "chat", "io", "__init__", "persona/__init__"):
        assert f"src/llmlab/{path}.py" in closure, path
    # Another family's typed params (params.py validates every section), not its stage code.
    assert "src/llmlab/inoculation/config.py" in closure
    assert "src/llmlab/inoculation/finetune.py" not in closure


def test_run_stage_adds_no_code_a_stage_does_not_import() -> None:
    """run_stage knows the user errors of many modules but imports none of them, so a stage
    that trains no model does not depend on the training code (nor re-run when it changes)."""
    closure = import_closure("llmlab.report")
    for path in ("training", "steering", "adapters", "models", "judge/judge"):
        assert f"src/llmlab/{path}.py" not in closure, path
    assert "src/llmlab/training.py" in import_closure("llmlab.persona.train")


def test_every_user_error_run_stage_names_exists() -> None:
    """The table is by name (so run_stage imports nothing): each entry must be a real
    exception class of its module."""
    import importlib

    sys.path.insert(0, str(SRC))
    from llmlab.stage import USER_ERRORS, user_errors

    for module, names in USER_ERRORS.items():
        loaded = importlib.import_module(module)
        for name in names:
            cls = getattr(loaded, name)
            assert isinstance(cls, type) and issubclass(cls, BaseException), (module, name)
            assert cls in user_errors(), (module, name)


def test_closure_reads_imports_in_functions_and_skips_type_checking(tmp_path, monkeypatch):
    pkg = tmp_path / "src" / PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "entry.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from llmlab import typed_only\n"
        "def main():\n    from . import lazy\n"
    )
    (pkg / "lazy.py").write_text("from .deep import x\n")
    (pkg / "deep.py").write_text("x = 1\n")
    (pkg / "typed_only.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "src")
    assert import_closure("llmlab.entry") == {
        f"src/llmlab/{n}.py" for n in ("__init__", "entry", "lazy", "deep")
    }


# ---------------------------------------------------------------- dvc.lock matches the code


def md5_of(path: Path) -> str:
    """The hash DVC records for a file: md5 of its bytes, CRLF-normalised for text files."""
    from dvc_data.hashfile.hash import file_md5

    return file_md5(os.fspath(path), name="md5")


def stale_code_deps(root: Path, declared: dict[str, list[str]]) -> dict[str, list[str]]:
    """Return {stage: [code files dvc.lock does not record as they are]} of a project.

    `declared` maps each stage that dvc.lock records to its code deps in dvc.yaml: a dep the
    lock lacks is stale too (the stage ran before the dep was declared).
    """
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    stale: dict[str, list[str]] = {}
    for name, entry in lock.items():
        recorded = {d["path"]: d.get("md5") for d in entry.get("deps", [])}
        for path in sorted(set(declared.get(name, [])) | set(recorded)):
            if not path.startswith("src/"):
                continue
            file = root / path
            if path not in recorded:
                stale.setdefault(name, []).append(f"{path} (not recorded)")
            elif not file.is_file() or md5_of(file) != recorded[path]:
                stale.setdefault(name, []).append(path)
    return stale


def test_dvc_lock_records_the_code_at_head() -> None:
    declared = {s.addressing: [d.def_path for d in s.deps] for s in dvc_stages()}
    stale = stale_code_deps(ROOT, declared)
    assert not stale, "dvc.lock is stale (run the stages, or `dvc commit` them): " + "; ".join(
        f"{stage}: {', '.join(files)}" for stage, files in sorted(stale.items())
    )


def test_stale_lock_check_names_the_stage_and_file(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    code = tmp_path / "src" / "a.py"
    code.write_text("x = 1\n")
    lock = {"schema": "2.0", "stages": {"s": {"cmd": "c", "deps": []}}}
    lock["stages"]["s"]["deps"] = [{"path": "src/a.py", "md5": md5_of(code)}]
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert stale_code_deps(tmp_path, {"s": ["src/a.py"]}) == {}
    assert stale_code_deps(tmp_path, {"s": ["src/a.py", "src/b.py"]}) == {
        "s": ["src/b.py (not recorded)"]
    }
    code.write_text("x = 2\n")
    assert stale_code_deps(tmp_path, {"s": ["src/a.py"]}) == {"s": ["src/a.py"]}


# ---------------------------------------------------------------- regenerating dvc.yaml


def rewrite_code_deps(text: str) -> str:
    """Return dvc.yaml text with each stage's `src/` deps replaced by its import closure.

    Works on the text so that comments, order and every other line stay as written.
    """
    parsed = yaml.safe_load(text)["stages"]
    lines = text.splitlines(keepends=True)
    result: list[str] = []
    stage: str | None = None
    in_deps = False
    written = False
    for line in lines:
        if m := re.match(r"^  (\w+):\s*$", line):
            stage, in_deps = m.group(1), False
        elif stage and re.match(r"^    deps:\s*$", line):
            in_deps, written = True, False
        elif in_deps and not line.startswith("      "):
            in_deps = False
        if in_deps and re.match(r"^      - src/", line):
            if not written:
                closure = sorted(import_closure(entry_module(parsed[stage]["cmd"])))
                result.extend(f"      - {p}\n" for p in closure)
                written = True
            continue
        result.append(line)
    return "".join(result)


if __name__ == "__main__":
    target = ROOT / "dvc.yaml"
    target.write_text(rewrite_code_deps(target.read_text()))


# ---------------------------------------------------------------- run-cache and git results

# A sanity check of a few conversations, not a computation worth restoring: its readable
# positions.txt stays in git beside the JSON.
SANITY_CHECKS = {"inoculation_smoke"}


def loads_model(stage) -> bool:
    """A stage that reads `runtime` (device, dtype) loads a model: GPU time on real models."""
    from dvc.dependency.param import ParamsDependency

    return any("runtime" in d.params for d in stage.deps if isinstance(d, ParamsDependency))


def run_cache_blockers(stage) -> list[str]:
    """Return why DVC cannot restore a stage's run on another machine (empty: it can).

    DVC's rules (dvc/stage/__init__.py and dvc/stage/cache.py): no run-cache entry is written
    when an uncached output is neither a metric nor a plot, nor when an output is `persist`;
    and a pushed entry restores elsewhere only if every cached output was pushed too.
    """
    blockers = []
    for out in stage.outs:
        if not out.use_cache and not (out.is_metric or out.is_plot):
            blockers.append(f"{out.def_path} is cache: false but neither a metric nor a plot")
        if out.persist:
            blockers.append(f"{out.def_path} is persist: true")
        if out.use_cache and not out.can_push:
            blockers.append(f"{out.def_path} is push: false")
    return blockers


def dvc_stages(root: Path = ROOT) -> list:
    from dvc.repo import Repo

    with Repo(os.fspath(root)) as repo:
        return list(repo.index.stages)


def test_every_model_loading_stage_is_restorable_from_a_pushed_run_cache() -> None:
    costly = [
        s for s in dvc_stages() if loads_model(s) and s.name.split("@")[0] not in SANITY_CHECKS
    ]
    assert len(costly) >= 25
    blocked = {s.addressing: b for s in costly if (b := run_cache_blockers(s))}
    assert not blocked, f"dvc.yaml: stages that would run again on another machine: {blocked}"


def test_git_results_of_the_other_stages_are_persist() -> None:
    """DVC deletes a stage's outputs before running it; a `persist` output is left in place.

    So a failed report stage leaves the committed metrics, reports and plots as they were.
    Model-loading stages cannot do this (DVC writes no run-cache entry for a `persist`
    output): their git outputs are metrics or plots that the run-cache restores.
    """
    loose = [
        f"{s.addressing}: {o.def_path}"
        for s in dvc_stages()
        if not loads_model(s)
        for o in s.outs
        if not o.use_cache and not o.persist
    ]
    assert not loose, f"dvc.yaml: git-tracked outputs deleted by a failed run: {loose}"


def test_blockers_name_each_rule() -> None:
    from types import SimpleNamespace as Out

    def out(path, cache=True, metric=False, plot=False, persist=False, push=True):
        return Out(
            def_path=path,
            use_cache=cache,
            is_metric=metric,
            is_plot=plot,
            persist=persist,
            can_push=push,
        )

    stage = Out(
        outs=[
            out("ok"),
            out("m.json", cache=False, metric=True),
            out("notes.md", cache=False),
            out("ckpt", persist=True),
            out("acts", push=False),
        ]
    )
    assert run_cache_blockers(stage) == [
        "notes.md is cache: false but neither a metric nor a plot",
        "ckpt is persist: true",
        "acts is push: false",
    ]


def test_a_failed_repro_keeps_persist_results_and_deletes_the_others(tmp_path: Path) -> None:
    """The DVC behaviour the `persist: true` flags rely on, on a stage whose command fails."""
    import subprocess

    stage = {
        "cmd": "python -c 'raise SystemExit(1)'",
        "deps": ["input.txt"],
        "outs": [{"kept.md": {"cache": False, "persist": True}}, {"lost.md": {"cache": False}}],
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"report": stage}}))
    for name in ("input.txt", "kept.md", "lost.md"):
        (tmp_path / name).write_text(f"{name} as committed\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"

    def dvc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["dvc", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )

    assert dvc("init", "--no-scm", "-q").returncode == 0
    failed = dvc("repro", "report")
    assert failed.returncode != 0
    assert (tmp_path / "kept.md").read_text() == "kept.md as committed\n"
    assert not (tmp_path / "lost.md").exists()
