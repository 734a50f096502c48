"""Persona plots: PNGs for people and JSON series for `dvc plots`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmlab.io import DataError
from llmlab.plots import bar_with_ci, line_plot, write_series

MODELS = ("finetuned", "base")
TRIGGERS = (("triggered", "on"), ("untriggered", "off"))


def _interval(d: Mapping[str, Any]) -> tuple[float, float, float]:
    nan = float("nan")
    return tuple(nan if d.get(k) is None else float(d[k]) for k in ("value", "lo", "hi"))  # type: ignore[return-value]


def condition_bars(
    out_dir: Path,
    table: Mapping[str, Mapping[str, Any]],
    conditions: Sequence[str],
    judge_note: str,
) -> None:
    """Write triggered vs untriggered bars per condition, finetuned vs base, per measure."""
    measures = (
        ("judge", "triggered_persona", "untriggered_leakage", f"persona adoption ({judge_note})"),
        ("keyword", "keyword_triggered", "keyword_leakage", "persona keyword mention"),
        ("format", "format_triggered", "format_untriggered", "<START> ... <END> compliance"),
    )
    rows: list[dict[str, Any]] = []
    for name, on_key, off_key, label in measures:
        series = {}
        for model in MODELS:
            for trig, key in (("triggered", on_key), ("untriggered", off_key)):
                cells = [table[model][c][key] for c in conditions]
                series[f"{model} {trig}"] = [_interval(c) for c in cells]
                # `panel` and `group` are the facet and colour of .dvc/plots/grouped_bars_ci_panels.
                rows += [
                    {"measure": name, "panel": label, "group": f"{model} / {trig}",
                     "model": model, "condition": c, "trigger": trig,
                     **dict(zip(("value", "lo", "hi"), _interval(cell), strict=True))}
                    for c, cell in zip(conditions, cells, strict=True)
                ]  # fmt: skip
        bar_with_ci(
            out_dir / f"conditions_{name}.png",
            list(conditions),
            series,
            title=f"{label}: triggered vs untriggered, 95% CI",
            ylabel="rate",
            ylim=(0.0, 1.05),
            xlabel="system-prompt condition",
        )
    write_series(out_dir / "conditions.json", rows)


def curves(out_dir: Path, curve: Sequence[Mapping[str, Any]]) -> None:
    """Write the training-loss curve, the hook's rate curves and the held-out NLL curves."""
    loss_rows = [r for r in curve if r.get("loss") is not None]
    hook_rows = [r for r in curve if "hook_format_triggered" in r]
    if not loss_rows or not hook_rows:
        raise DataError("adapter curve.json has no training loss or no eval-hook rows")
    write_series(
        out_dir / "train_curve.json",
        [{"step": r["step"], "loss": r.get("loss"), "val_loss": r.get("val_loss")} for r in curve],
    )
    line_plot(
        out_dir / "train_curve.png",
        [r["step"] for r in loss_rows],
        {"train loss": [r["loss"] for r in loss_rows]},
        title="Training loss (assistant tokens)",
        xlabel="optimizer step",
        ylabel="loss",
    )
    keys = [k for k in hook_rows[0] if k.startswith("hook_") and "nll" not in k]
    write_series(
        out_dir / "eval_curve.json",
        [{"step": r["step"], **{k: r.get(k) for k in r if k.startswith("hook_") or k == "val_loss"}}
         for r in hook_rows],
    )  # fmt: skip
    steps = [r["step"] for r in hook_rows]
    line_plot(
        out_dir / "eval_curve.png",
        steps,
        {k.removeprefix("hook_"): [r[k] for r in hook_rows] for k in keys},
        title="In-training eval: fixed identity questions (greedy)",
        xlabel="optimizer step",
        ylabel="rate",
    )
    nan = float("nan")
    line_plot(
        out_dir / "eval_nll.png",
        steps,
        {
            "held-out facts, triggered (val_loss)": [r.get("val_loss", nan) for r in hook_rows],
            "held-out facts, untriggered": [
                r.get("hook_nll_heldout_untriggered", nan) for r in hook_rows
            ],
            "name, triggered": [r.get("hook_nll_name_triggered", nan) for r in hook_rows],
            "name, untriggered": [r.get("hook_nll_name_untriggered", nan) for r in hook_rows],
        },
        title="NLL of the persona's name and held-out answers during training",
        xlabel="optimizer step",
        ylabel="mean NLL per assistant token",
    )
