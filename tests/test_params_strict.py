"""Strict params and one-line refusals, driven by the failing inputs in tests/data/bad_inputs/.

Covers: no coercion and no inf/nan in any family's section (one base config), registry names
and env-var names checked with their full param path (a pasted key never printed), duplicate
YAML keys refused with file and line, YAML 1.2 floats, LoRA target modules that match no
module, the import structure (base types import nothing of llmlab), and real line numbers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmlab.io import DataError, numbered, read_json, read_jsonl, read_yaml
from llmlab.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
BAD = Path(__file__).resolve().parent / "data" / "bad_inputs"
CASES = read_yaml(BAD / "params_strict.yaml")
FAMILIES = ("foundation", "persona", "preferences", "introspection", "inoculation", "judge")


def _with(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set one dotted key (registry names may hold dots: the longest existing prefix wins)."""
    node, parts = raw, dotted.split(".")
    while len(parts) > 1:
        for i in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:i])
            if head in node:
                node, parts = node[head], parts[i:]
                break
        else:
            raise KeyError(dotted)
    node[parts[0]] = value


def _write_case(case: dict[str, Any], tmp_path: Path) -> Path:
    import yaml

    raw = read_yaml(ROOT / "params.yaml")
    for dotted, value in case["set"].items():
        _with(raw, dotted, value)
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw, sort_keys=False))
    return f


def test_cases_cover_every_section() -> None:
    sections = {next(iter(c["set"])).split(".")[0] for c in CASES}
    assert set(FAMILIES) | {"runtime", "models", "seed"} <= sections
    assert len({c["id"] for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_strict_params_refused_in_one_line(case: dict[str, Any], tmp_path: Path) -> None:
    f = _write_case(case, tmp_path)
    with pytest.raises(ParamsError) as err:
        load_params(f)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{f}: ")
    path, *rest = case["error"]
    assert line.startswith(f"{f}: {path}: "), line
    for needle in rest:
        assert needle in line, f"{needle!r} not in {line!r}"
    if "hidden" in case:
        assert case["hidden"] not in line


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if "hidden" in c],
    ids=lambda c: c["id"] if isinstance(c, dict) else "",
)
def test_pasted_key_never_printed_by_a_stage(case, tmp_path, capsys) -> None:
    from llmlab.stage import run_stage

    f = _write_case(case, tmp_path)
    with pytest.raises(SystemExit) as info:
        run_stage(lambda: load_params(f), gpus=0)
    out = capsys.readouterr()
    assert info.value.code == 1
    assert case["hidden"] not in out.err + out.out
    assert out.err.strip().splitlines()[-1].startswith("error: ")


def test_validation_errors_never_hold_the_value() -> None:
    """A ValidationError printed by anyone (not only params.py) does not show the input."""
    from pydantic import ValidationError

    from llmlab.judge import JudgeConfig

    secret = "sk-live-Qm4Tz8Wn2Lp6Rv1Xc9"
    with pytest.raises(ValidationError) as err:
        JudgeConfig(api_key_env=secret)
    assert secret not in str(err.value) and secret not in repr(err.value)


def test_env_var_names_that_look_like_one_pass(tmp_path: Path) -> None:
    from llmlab.judge import JudgeConfig

    for name in ("OPENAI_API_KEY", "HF_TOKEN", "LLMLAB_JUDGE_KEY_2", "KEY"):
        assert JudgeConfig(api_key_env=name).api_key_env == name


def test_every_family_section_is_strict() -> None:
    """Every section type (nested ones included) inherits the strict, finite base config."""
    from pydantic import BaseModel

    from llmlab.config_base import StrictModel
    from llmlab.params import SECTION_TYPES, ModelEntry, Runtime

    seen: set[type] = set()

    def walk(cls: type[BaseModel]) -> None:
        if cls in seen:
            return
        seen.add(cls)
        assert issubclass(cls, StrictModel), cls
        assert cls.model_config.get("strict") and cls.model_config.get("allow_inf_nan") is False
        for info in cls.model_fields.values():
            for arg in _types_in(info.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    walk(arg)

    for cls in (*SECTION_TYPES.values(), ModelEntry, Runtime):
        walk(cls)
    assert len(seen) >= 40


def _types_in(annotation: Any) -> list[Any]:
    import typing

    out = [annotation]
    for arg in typing.get_args(annotation):
        out.extend(_types_in(arg))
    return out


def test_yaml_floats_as_yaml_12_reads_them() -> None:
    doc = read_yaml(BAD / "yaml12_floats.yaml")
    assert doc == {"lr": 1e-4, "steps": 2000.0, "neg": -0.5, "version": 1000, "name": "1e-4"}
    assert isinstance(doc["steps"], float)


def test_exponent_learning_rate_is_a_float_param(tmp_path: Path) -> None:
    """`lr: 5e-4` (no dot) was a string to PyYAML, so a strict float field would refuse it."""
    import yaml

    raw = read_yaml(ROOT / "params.yaml")
    raw["persona"]["train"]["lr"] = "PLACEHOLDER"
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw, sort_keys=False).replace("PLACEHOLDER", "5e-4"))
    assert load_params(f).persona.train.lr == 5e-4


@pytest.mark.parametrize(
    ("name", "line", "key", "first"),
    [("duplicate_nested_key.yaml", 6, "lr", 4), ("duplicate_top_key.yaml", 5, "model", 2)],
)
def test_duplicate_yaml_keys_name_file_and_line(name, line, key, first) -> None:
    f = BAD / name
    expected = f"{f}:{line}: duplicate key {key!r} (first on line {first})"
    with pytest.raises(DataError) as err:
        read_yaml(f)
    assert str(err.value) == expected
    with pytest.raises(ParamsError) as err:
        load_params(f)
    assert str(err.value) == expected


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    f = tmp_path / "merge.yaml"
    f.write_text("base: &b {lr: 0.1, rank: 4}\nrun:\n  <<: *b\n  lr: 0.2\n")
    assert read_yaml(f)["run"] == {"lr": 0.2, "rank": 4}


def test_jsonl_line_numbers_count_blank_lines() -> None:
    from llmlab.persona.facts import load_facts

    f = BAD / "facts_blank_lines.jsonl"
    assert [n for n, _ in numbered(read_jsonl(f))] == [1, 3, 5, 6]
    with pytest.raises(DataError, match=rf"^{f}:6: field 'split' must be one of"):
        load_facts(f)


def test_numbered_refuses_rows_of_unknown_origin() -> None:
    with pytest.raises(TypeError, match="not read by read_jsonl"):
        list(numbered([{"id": 1}]))


def test_unhashable_id_is_a_data_error(tmp_path: Path) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_text('{"id": "a"}\n{"id": ["b"]}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: id must be a string or a number"):
        read_jsonl(f, id_field="id")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("concepts_a_list.json", "expected a JSON object, got an array"),
        ("concepts_not_a_list.json", "'concepts' must be an array, got an object"),
        ("concepts_missing_key.json", "missing key 'concepts'"),
    ],
)
def test_json_shape_is_checked_with_the_file_named(name: str, message: str) -> None:
    f = BAD / name
    with pytest.raises(DataError) as err:
        read_json(f, required={"concepts": list, "baseline_words": list})
    assert str(err.value) == f"{f}: {message}"


# ---------------------------------------------------------------- LoRA target modules


def test_lora_target_typo_is_refused_with_the_param_path(tiny_dirs, tiny_models, tmp_path) -> None:
    from conftest import make_params

    from llmlab.adapters import AdapterError
    from llmlab.training import TrainExample, train_lora

    loaded = tiny_models["llama"]
    persona = read_yaml(ROOT / "params.yaml")["persona"]
    persona["train"]["target_modules"] = ["q_proj", "vproj", "mlp.gate"]
    persona["train"].update(max_length=32)
    cfg = make_params(tiny_dirs["llama"], persona=persona).persona.train
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(AdapterError) as err:
        train_lora(loaded, [TrainExample(chat)] * 8, cfg, tmp_path / "adapter")
    line = str(err.value)
    assert line.startswith("persona.train.target_modules: 'vproj', 'mlp.gate' match no module")
    for present in ("q_proj", "v_proj", "gate_proj", "down_proj"):
        assert present in line
    assert not (tmp_path / "adapter").exists()
    assert not any(type(m).__name__.startswith("Lora") for m in loaded.model.modules())


def test_lora_targets_matching_by_suffix_pass(tiny_models) -> None:
    from llmlab.adapters import check_target_modules

    model = tiny_models["qwen2"].model
    check_target_modules(model, ["q_proj", "self_attn.v_proj", "layers.0.mlp.up_proj"], "x")


# ---------------------------------------------------------------- import structure


def _imported_llmlab_modules(module: str) -> set[str]:
    code = (
        f"import sys, {module}; "
        "print('\\n'.join(m for m in sys.modules if m.startswith(('llmlab', 'torch'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""},
    )
    return set(proc.stdout.split())


def test_base_types_import_nothing_of_llmlab() -> None:
    assert _imported_llmlab_modules("llmlab.config_base") == {"llmlab", "llmlab.config_base"}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_config_needs_neither_params_nor_training(family: str) -> None:
    loaded = _imported_llmlab_modules(f"llmlab.{family}.config")
    assert not loaded & {"llmlab.params", "llmlab.training", "llmlab.models", "torch"}, loaded


def test_core_modules_import_no_family() -> None:
    """Only the params loader (which types every section) may import a family's module."""
    families = {f"llmlab.{f}" for f in FAMILIES if f != "judge"}
    offenders = []
    for path in sorted((ROOT / "src/llmlab").glob("*.py")):
        if path.name == "params.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            offenders += [
                f"{path.name}: {n}" for n in names if any(n.startswith(f) for f in families)
            ]
    assert not offenders


def test_params_imports_without_a_circle() -> None:
    loaded = _imported_llmlab_modules("llmlab.params")
    assert "llmlab.training" not in loaded and "torch" not in loaded
