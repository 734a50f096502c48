"""`python -m llmlab.preset <preset>`: one command that runs a preset on its family's stages.

The command it builds is `dvc exp run <family>_report ... -S key=value ...` (checked through
`--dry-run` and through the call it makes), every flag parses in DVC's override grammar, and a
typo in the preset or in an extra `-S` key is refused in one line before DVC starts.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from llmlab import preset as preset_mod
from llmlab.params import FAMILY_SECTIONS

ROOT = Path(__file__).resolve().parents[1]
PAPER = {f: ROOT / f"configs/{f}_paper.yaml" for f in FAMILY_SECTIONS[1:]}


def run_preset(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmlab.preset", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def overrides(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == "-S"]


def test_dry_run_prints_the_dvc_command_for_the_persona_stages_only() -> None:
    proc = run_preset(
        str(PAPER["persona"]), "--dry-run", "--queue", "-S", "persona.train.seed=1,2,3"
    )
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout.strip())
    assert cmd[:5] == ["dvc", "exp", "run", "--queue", "persona_report"]
    assert [a for a in cmd if a.endswith("_report")] == ["persona_report"]
    flags = overrides(cmd)
    preset = yaml.safe_load(PAPER["persona"].read_text())
    assert len(flags) == len(preset) + 1
    assert all(f.lstrip("+").startswith("persona.") for f in flags), flags
    assert flags[-1] == "persona.train.seed=1,2,3"  # after the preset's: it wins
    parsed = {
        o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(flags[:-1])
    }
    assert parsed["persona.model"] == "llama-3.1-8b-instruct"
    assert parsed["persona.train.lr"] == preset["persona.train.lr"]


@pytest.mark.parametrize("family", sorted(PAPER))
def test_every_paper_preset_targets_its_family_on_its_own_model(family: str) -> None:
    cmd = preset_mod.dvc_command(PAPER[family], ROOT / "params.yaml")
    assert [a for a in cmd if a.endswith("_report")] == [f"{family}_report"]
    flags = overrides(cmd)
    assert all(f.lstrip("+").split(".", 1)[0] == family for f in flags), flags
    assert any(f.startswith(f"{family}.model=") for f in flags)
    OverridesParser.create().parse_overrides(flags)  # every flag is valid `-S` grammar


def test_a_mapping_over_an_empty_one_adds_its_keys(tmp_path: Path) -> None:
    """DVC refuses `-S key=value` for a key params.yaml lacks; the preset writes `+key=value`."""
    path = tmp_path / "p.yaml"
    path.write_text(
        "preferences:\n  tasks:\n    hub: {gsm8k: 3000}\n  train:\n    n_tasks: 10000\n"
    )
    flags = overrides(preset_mod.dvc_command(path, ROOT / "params.yaml"))
    assert "+preferences.tasks.hub.gsm8k=3000" in flags
    assert "preferences.train.n_tasks=10000" in flags


def test_a_preset_over_several_families_targets_each_report(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("persona.train.seed: 2\ninoculation:\n  seed: 3\nruntime.dtype: float32\n")
    cmd = preset_mod.dvc_command(path, ROOT / "params.yaml")
    assert cmd[3:5] == ["persona_report", "inoculation_report"]
    assert overrides(cmd) == [
        "persona.train.seed=2",
        "inoculation.seed=3",
        'runtime.dtype="float32"',
    ]


def test_a_typo_in_the_preset_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("persona.model: llama-3.1-8b-instruct\npersona.train.lrr: 0.001\n")
    proc = run_preset(str(path), "--dry-run")
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and f"{path}: persona.train.lrr: unknown key" in lines[0]


def test_a_typo_in_an_extra_override_is_refused_in_one_line() -> None:
    proc = run_preset(str(PAPER["persona"]), "--dry-run", "-S", "persona.train.sed=1,2")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert "persona.train.sed: not a key of params.yaml" in proc.stderr


def test_a_preset_of_no_family_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shared.yaml"
    path.write_text("runtime.dtype: float32\n")
    with pytest.raises(Exception, match="sets no family's params"):
        preset_mod.dvc_command(path, ROOT / "params.yaml")


def test_without_dry_run_it_runs_that_command(monkeypatch, capsys) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], check: bool) -> types.SimpleNamespace:
        calls.append(cmd)
        return types.SimpleNamespace(returncode=3)

    monkeypatch.setattr(preset_mod.subprocess, "run", fake_run)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["preset", str(PAPER["inoculation"]), "-n", "inoc-paper"])
    with pytest.raises(SystemExit) as exit_:
        preset_mod.main()
    assert exit_.value.code == 3  # DVC's status is the command's
    printed = shlex.split(capsys.readouterr().out.strip())
    (call,) = calls
    assert Path(call[0]).name == "dvc"
    assert call[1:] == printed[1:]
    assert printed[3:6] == ["-n", "inoc-paper", "inoculation_report"]
