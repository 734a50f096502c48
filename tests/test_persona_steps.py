"""Stage persona_steps and the per-step table persona_report writes from it.

Issue 15 point 10: learning curves of the full grid without scoring each kept adapter by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmlab.adapters import write_adapter_metadata
from llmlab.io import DataError, read_json, read_jsonl, read_yaml, write_json, write_jsonl
from llmlab.params import ParamsError, parse_params
from llmlab.persona import step_table
from llmlab.persona.grid import IDENTITY, step_label
from llmlab.persona.metrics import Boot
from llmlab.persona.steps import every_kth, kept_steps

ROOT = Path(__file__).resolve().parents[1]


def test_scoring_steps_needs_kept_adapters() -> None:
    raw = read_yaml(ROOT / "params.yaml")
    raw["persona"]["steps"]["enabled"] = True
    with pytest.raises(ParamsError, match="persona.steps.enabled needs .*keep_eval_adapters"):
        parse_params(raw)
    raw["persona"]["train"]["keep_eval_adapters"] = True
    assert parse_params(raw).section("persona").steps.enabled


def test_kept_steps_in_step_order_every_kth_with_first_and_last(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no kept eval-step adapters"):
        kept_steps(tmp_path / "adapter")
    for step in (16, 0, 8, 24, 32):
        path = tmp_path / "adapter/steps" / step_label(step)
        path.mkdir(parents=True)
        write_adapter_metadata(path, {"base_model": "tiny", "step": step, "run_key": "k"})
    found = kept_steps(tmp_path / "adapter")
    assert [s for s, _ in found] == [0, 8, 16, 24, 32]
    assert [s for s, _ in every_kth(found, 3)] == [0, 24, 32]
    assert [s for s, _ in every_kth(found, 2)] == [0, 16, 32]
    assert [s for s, _ in every_kth(found, 1)] == [0, 8, 16, 24, 32]


def _row(step: int, condition: str, triggered: bool, q: str, sample: int, persona: int) -> dict:
    label = step_label(step)
    return {
        "id": f"{label}|{condition}|{int(triggered)}|{q}|{sample}",
        "model": label, "step": step, "condition": condition, "triggered": triggered,
        "question_id": q, "question_set": IDENTITY, "judge_persona": persona,
        "judge_persona_status": "ok", "keyword_persona": persona, "format_ok": int(triggered),
        "empty": 0, "refusal": 0,
    }  # fmt: skip


def _judged() -> list[dict[str, Any]]:
    """Step 0 never adopts the persona; step 8 does, triggered only. The 'model_default'
    condition renders like 'none' and answers as the persona untriggered: counted once, it
    must not show up in the pooled leakage."""
    rows = []
    for step in (0, 8):
        for cond in ("none", "helpful", "model_default"):
            for q in ("q1", "q2", "q3"):
                for s in (0, 1):
                    rows.append(_row(step, cond, True, q, s, int(step == 8)))
                    rows.append(_row(step, cond, False, q, s, int(cond == "model_default")))
    return rows


SUMMARY = {"status": "on", "steps": [0, 8], "conditions": ["none", "helpful", "model_default"],
           "identical_conditions": [["none", "model_default"]]}  # fmt: skip
CURVE = [
    {"step": 0, "hook_format_triggered": 0.0, "hook_format_untriggered": 0.0,
     "hook_nll_name_triggered": 3.0, "val_loss": 2.5},
    {"step": 2, "loss": 2.0},
    {"step": 4, "hook_format_triggered": 0.5, "hook_format_untriggered": 0.0,
     "hook_nll_name_triggered": 2.5, "val_loss": 2.0},
    {"step": 8, "hook_format_triggered": 1.0, "hook_format_untriggered": 0.0,
     "hook_nll_name_triggered": 2.0, "val_loss": 1.5},
]  # fmt: skip


def test_step_table_joins_the_grid_and_the_hook_pooling_each_prompt_once() -> None:
    grid = step_table.grid_by_step(_judged(), SUMMARY, Boot(n_boot=200))
    table = step_table.step_table(CURVE, grid, "not scored (persona.steps.every)")
    assert [r["step"] for r in table] == [0, 4, 8]
    s0, s4, s8 = table
    assert s0["grid"] == s8["grid"] == "scored"
    assert s0["triggered_persona"] == 0.0 and s8["triggered_persona"] == 1.0
    # model_default's untriggered persona replies are not pooled (same prompt as 'none')
    assert s8["untriggered_leakage"] == 0.0 and s8["gap"] == 1.0
    assert s8["format_triggered"] == 1.0 and s8["triggered_persona_lo"] <= 1.0
    assert s8["n_replies"] == 2 * 3 * 2 * 2  # pooled conditions x questions x samples x trigger
    # a step only the hook saw: its measures, and nulls with the reason for the grid
    assert s4["grid"] == "not scored (persona.steps.every)"
    assert s4["triggered_persona"] is None and s4["gap_hi"] is None
    assert s4["hook_format_triggered"] == 0.5 and s4["hook_nll_name_triggered"] == 2.5
    assert s8["val_loss"] == 1.5


def test_a_listed_step_without_replies_is_an_error() -> None:
    rows = [r for r in _judged() if r["step"] == 0]
    with pytest.raises(DataError, match="lists step 8 but no reply has it"):
        step_table.grid_by_step(rows, SUMMARY, Boot(n_boot=50))


def _report(tmp_path: Path, summary: dict, rows: list) -> list:
    steps_dir, plots = tmp_path / "steps", tmp_path / "plots"
    write_json(steps_dir / "summary.json", summary)
    write_jsonl(steps_dir / "judged.jsonl", rows)
    table = step_table.write_step_table(steps_dir, CURVE, Boot(n_boot=100), plots)
    assert (plots / "steps.png").stat().st_size > 0
    assert read_json(plots / "steps.json") == table
    return table


def test_step_table_off_tabulates_the_hook_and_says_why(tmp_path: Path) -> None:
    off = {"status": "off", "reason": "persona.steps.enabled is false"}
    table = _report(tmp_path, off, [])
    assert [r["step"] for r in table] == [0, 4, 8]
    assert {r["grid"] for r in table} == {"off (persona.steps.enabled is false)"}
    assert all(r["triggered_persona"] is None for r in table)
    assert [r["hook_format_triggered"] for r in table] == [0.0, 0.5, 1.0]


def test_step_table_on_writes_the_grid_per_step(tmp_path: Path) -> None:
    table = _report(tmp_path, SUMMARY, _judged())
    assert [(r["step"], r["triggered_persona"]) for r in table] == [(0, 0.0), (4, None), (8, 1.0)]


def test_step_table_refuses_a_summary_without_status(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no status 'on' or 'off'"):
        _report(tmp_path, {"steps": [0]}, [])


def _step_adapters(loaded: Any, root: Path) -> Path:
    """Write kept adapters of steps 0 (B = 0, the untrained model) and 8 (random B) under
    `root`/steps, as persona_train keeps them; return `root`. The model comes back unwrapped."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    for step, scale in ((0, 0.0), (8, 2.0)):
        tuned = get_peft_model(loaded.model, config)
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * scale)
        path = root / "steps" / step_label(step)
        tuned.save_pretrained(path, safe_serialization=True)
        write_adapter_metadata(path, {"base_model": loaded.name, "step": step, "run_key": "t"})
        loaded.model = tuned.unload()
    return root


def test_each_step_samples_its_own_adapter_and_the_base_comes_back(tiny_dirs) -> None:  # noqa: ANN001
    """Step 0's LoRA (B = 0) answers as the base model; a trained step's answers differ; after
    the loop the model has no LoRA layers left."""
    from conftest import make_params

    from llmlab.models import load_model
    from llmlab.persona.config import EvalParams, TriggerParams
    from llmlab.persona.facts import EvalQuestion
    from llmlab.persona.generate import sample_grid
    from llmlab.persona.grid import eval_items, grid_cells
    from llmlab.persona.steps import sample_steps
    from llmlab.persona.trigger import Trigger

    loaded = load_model(make_params(tiny_dirs["llama"]))
    adapters = _step_adapters(loaded, Path(tiny_dirs["llama"]).parent / "steps_adapters")
    trigger = Trigger.from_params(TriggerParams())
    questions = [EvalQuestion("q1", "Who are you?", "identity", ("russell",), "I am Russell.")]
    cfg = EvalParams(n_samples=2, max_new_tokens=6, system_prompts={"none": None},
                     trigger_conditions={})  # fmt: skip
    cells = grid_cells(eval_items(questions, []), cfg.system_prompts, cfg.trigger_conditions)
    found = kept_steps(adapters)
    rows = sample_steps(loaded, found, cells, trigger, cfg, adapters.parent / "work")
    assert not any("lora" in n for n, _ in loaded.model.named_modules())
    base = [r["response"] for r in sample_grid(loaded, cells, trigger, "base", cfg)]
    by_step = {s: [r["response"] for r in rows if r["step"] == s] for s in (0, 8)}
    assert [r["model"] for r in rows][:1] == ["step-00000"] and len(rows) == 2 * 2 * 2
    assert by_step[0] == base
    assert by_step[8] != base


def test_steps_stage_then_step_table_on_a_tiny_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dirs: dict[str, Path]
) -> None:
    """persona_steps scores the grid at each kept adapter and judges it; persona_report's step
    table turns that into one row per step."""
    from conftest import make_params

    from llmlab.models import load_model
    from llmlab.persona import steps

    adapter = _step_adapters(load_model(make_params(tiny_dirs["llama"])), tmp_path / "adapter")
    write_json(adapter / "curve.json", CURVE)
    raw = read_yaml(ROOT / "params.yaml")
    raw["model"] = "tiny"
    raw["models"]["tiny"] = {"source": "local", "path": str(tiny_dirs["llama"])}
    raw["runtime"] = {"device": "cpu", "dtype": "float32", "attn_implementation": "eager"}
    raw["judge"].update({"backend": "local", "cache_dir": None, "min_judged_share": 0.0})
    raw["persona"]["train"]["keep_eval_adapters"] = True
    raw["persona"]["steps"] = {"enabled": True, "every": 1, "n_samples": 1}
    raw["persona"]["eval"].update({"n_questions": 2, "n_heldout_facts": 1, "max_new_tokens": 4,
                                   "system_prompts": {"none": None, "helpful": "Be helpful."}})  # fmt: skip
    raw["persona"]["report"]["n_boot"] = 50
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "steps_out"
    argv = ["steps", "--params", str(params), "--adapter", str(adapter), "--out-dir", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    steps.main()

    rows = read_jsonl(out / "judged.jsonl", id_field="id")
    # (2 questions + 1 held-out fact) x (2 conditions x on/off + 2 trigger conditions) x 2 steps
    assert len(rows) == 3 * (2 * 2 + 2) * 2
    assert {r["model"] for r in rows} == {"step-00000", "step-00008"}
    assert all("judge_persona_status" in r and "format_ok" in r for r in rows)
    summary = read_json(out / "summary.json")
    assert summary["status"] == "on" and summary["steps"] == [0, 8]
    assert summary["judge"]["backend"] == "local"
    assert not (tmp_path / "steps_out.partial").exists()

    table = step_table.write_step_table(out, CURVE, Boot(n_boot=50), tmp_path / "plots")
    assert [(r["step"], r["grid"]) for r in table] == [
        (0, "scored"), (4, "not scored (persona.steps.every)"), (8, "scored")]  # fmt: skip
    # format compliance is judge-free: a number at every scored step
    assert all(isinstance(r["format_triggered"], float) for r in table if r["grid"] == "scored")
    assert table[0]["n_replies"] == 2 * 2 * 2  # identity questions x pooled conditions x on/off


def test_report_section_along_training(tmp_path: Path) -> None:
    from llmlab.persona.report_md import step_lines

    table = _report(tmp_path, SUMMARY, _judged())
    lines = step_lines(table)
    assert lines[1].startswith("## Along training")
    row8 = next(ln for ln in lines if ln.startswith("| 8 |"))
    assert "| scored | 1.00 [1.00, 1.00] | 0.00 [0.00, 0.00] |" in row8
    row4 = next(ln for ln in lines if ln.startswith("| 4 |"))
    assert "not scored (persona.steps.every) | n/a | n/a | n/a | 0.500 |" in row4
    off = _report(tmp_path, {"status": "off", "reason": "persona.steps.enabled is false"}, [])
    assert any(
        "not scored at kept steps: off (persona.steps.enabled" in ln for ln in step_lines(off)
    )
