"""The per-step table and plot of the persona run (written by persona_report, CPU only).

One row per training step that has any measure: the training hook's (greedy format and
keyword rates, judge-free NLL of the persona's name and of held-out answers, at every eval step)
and, where persona_steps scored the grid at that step's kept adapter, the judged rates pooled
over the system-prompt conditions as the headline pools them (identity questions, each prompt
once, trigger conditions apart), with their hierarchical-bootstrap intervals. A step the grid
was not scored at has nulls there and `grid` saying why, never a number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmlab.io import DataError, read_json, read_jsonl
from llmlab.persona.grid import IDENTITY, step_label
from llmlab.persona.grid import STEPS_JUDGED as JUDGED
from llmlab.persona.grid import STEPS_SUMMARY as SUMMARY
from llmlab.persona.metrics import ALL, Boot, cell_metrics, pooled_conditions
from llmlab.plots import line_plot, write_series

# The grid's rates per step (value, lo, hi each) and the judge's coverage.
GRID_RATES = ("triggered_persona", "untriggered_leakage", "gap", "format_triggered",
              "keyword_triggered", "keyword_leakage")  # fmt: skip
HOOK = ("hook_format_triggered", "hook_format_untriggered", "hook_persona_keyword_triggered",
        "hook_persona_keyword_untriggered", "hook_nll_name_triggered",
        "hook_nll_name_untriggered", "hook_nll_heldout_triggered",
        "hook_nll_heldout_untriggered", "val_loss")  # fmt: skip


def grid_by_step(
    rows: list[dict[str, Any]], summary: dict[str, Any], boot: Boot
) -> dict[int, dict[str, Any]]:
    """Return {step: flat grid rates with intervals} of the scored steps."""
    keep = set(pooled_conditions(summary["conditions"], summary["identical_conditions"]))
    pooled = [r for r in rows if r["condition"] in keep]
    with_as_ai = any("judge_as_ai" in r for r in rows)
    out: dict[int, dict[str, Any]] = {}
    for step in summary["steps"]:
        label = step_label(step)
        if not any(r["model"] == label for r in pooled):
            raise DataError(f"persona_steps summary lists step {step} but no reply has it")
        cell = cell_metrics(pooled, model=label, condition=ALL, question_set=IDENTITY,
                            boot=boot, with_as_ai=with_as_ai)  # fmt: skip
        flat: dict[str, Any] = {}
        for k in GRID_RATES:
            flat[k], flat[f"{k}_lo"], flat[f"{k}_hi"] = (cell[k][x] for x in ("value", "lo", "hi"))
        flat["judge_judged_share_triggered"] = cell["judge_judged_share_triggered"]
        flat["judge_judged_share_untriggered"] = cell["judge_judged_share_untriggered"]
        flat["n_replies"] = cell["n_replies"]
        out[step] = flat
    return out


def step_table(
    curve: list[dict[str, Any]], grid: dict[int, dict[str, Any]], not_scored: str
) -> list[dict[str, Any]]:
    """Return one row per step of the hook's eval rows or the scored grid, by step.

    not_scored: the `grid` field of a step without grid rates (why it has none).
    """
    hook = {r["step"]: r for r in curve if any(k in r for k in HOOK if k != "val_loss")}
    blank = {k: None for name in GRID_RATES for k in (name, f"{name}_lo", f"{name}_hi")}
    blank |= {"judge_judged_share_triggered": None, "judge_judged_share_untriggered": None,
              "n_replies": None}  # fmt: skip
    table = []
    for step in sorted({*hook, *grid}):
        row: dict[str, Any] = {"step": step, "grid": "scored" if step in grid else not_scored}
        row |= grid.get(step, blank)
        row |= {k: hook.get(step, {}).get(k) for k in HOOK}
        table.append(row)
    return table


def plot(path: Path, table: list[dict[str, Any]], scored: bool) -> None:
    """Draw the grid's rates along training, or the hook's when the grid was not scored."""
    if scored:
        rows = [r for r in table if r["grid"] == "scored"]
        keys = {"triggered persona (judge)": "triggered_persona",
                "untriggered leakage (judge)": "untriggered_leakage",
                "triggered format": "format_triggered",
                "triggered keyword": "keyword_triggered"}  # fmt: skip
        title = "Persona grid at the kept training steps (pooled system prompts)"
    else:
        rows = [r for r in table if r["hook_format_triggered"] is not None]
        keys = {"hook format, triggered": "hook_format_triggered",
                "hook format, untriggered": "hook_format_untriggered",
                "hook keyword, triggered": "hook_persona_keyword_triggered",
                "hook keyword, untriggered": "hook_persona_keyword_untriggered"}  # fmt: skip
        title = "Grid not scored at kept steps (persona.steps off): in-training hook only"
    if not rows:
        raise DataError(f"{path}: no step has a measure to plot")
    nan = float("nan")
    line_plot(
        path,
        [r["step"] for r in rows],
        {label: [nan if r[k] is None else r[k] for r in rows] for label, k in keys.items()},
        title=title,
        xlabel="optimizer step",
        ylabel="rate",
    )


def write_step_table(
    steps_dir: Path, curve: list[dict[str, Any]], boot: Boot, plots: Path
) -> list[dict[str, Any]]:
    """Write `steps.json` (the table, also the series of the dvc plot) and `steps.png` under
    `plots` from persona_steps' outputs and the adapter's curve; return the table."""
    summary = read_json(steps_dir / SUMMARY)
    if summary.get("status") == "on":
        rows = read_jsonl(steps_dir / JUDGED, id_field="id")
        grid = grid_by_step(rows, summary, boot)
        not_scored = "not scored (persona.steps.every)"
    elif summary.get("status") == "off":
        grid, not_scored = {}, f"off ({summary['reason']})"
    else:
        raise DataError(f"{steps_dir / SUMMARY}: no status 'on' or 'off'")
    table = step_table(curve, grid, not_scored)
    write_series(plots / "steps.json", table)
    plot(plots / "steps.png", table, bool(grid))
    return table
