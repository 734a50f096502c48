"""Stage inoculation_finetune: LoRA finetunes on the ALL-CAPS data per condition and seed.

Conditions: neutral, inoculation and the loss-matched control chosen by the control stage;
each trains on every stage-1 example (system prompt of the condition, CAPS completion as the
target). With `finetune.baseline_normal`, a fourth condition trains on the normal-case
completions under the neutral prompt: the drift baseline of ordinary finetuning. Every `lora.eval_every` steps (and before the first and after the last step) the
eval hook measures the trait-ward gradient alignment cos(-g_l, v_l) at pre_assistant on a
fixed log batch of calibration examples under the run's own system prompt, for the alignment
layer subset; the values land in each adapter's curve.json and in runs.json.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from llmlab.inoculation.common import (
    BASELINE_CONDITION,
    CONTROL_TABLE,
    DIRECTION_DIR,
    EXAMPLES,
    FINETUNE_CONDITIONS,
    MODELS_DIR,
    PLOTS_DIR,
    at_precision,
    calibration_examples,
    conversation,
    load_direction,
    precision,
    read_examples,
    resolve_prompts,
    section,
)
from llmlab.inoculation.config import CANONICAL_POSITION
from llmlab.inoculation.gradalign import encode_targets, measure_alignment
from llmlab.io import read_json, write_json
from llmlab.layers import resolve_layers
from llmlab.models import LoadedModel, load_model
from llmlab.params import load_params
from llmlab.plots import line_plot, write_series
from llmlab.stage import run_stage, seed_everything
from llmlab.training import TrainExample, train_lora

RUNS_FILE = "runs.json"


def run_name(condition: str, seed: int) -> str:
    """Return the adapter directory name of one run."""
    return f"{condition}_s{seed}"


def alignment_hook(
    loaded: LoadedModel,
    encoded: list[Any],
    layers: list[int],
    directions: np.ndarray,
    batch_size: int,
) -> Callable[[Any, int], dict[str, float]]:
    """Return an eval hook measuring trait-ward alignment of the log batch on the current model."""

    def hook(model: Any, step: int) -> dict[str, float]:
        view = dataclasses.replace(loaded, model=model)
        res = measure_alignment(view, encoded, layers, [CANONICAL_POSITION], directions, batch_size)
        align = -res.cos[:, :, 0]
        values = {
            "align_mean": float(align.mean()),
            "log_loss": float(res.loss.mean()),
            "g_norm_mean": float(res.grad_norm[:, :, 0].mean()),
        }
        values.update(
            {f"align_L{layer}": float(align[:, i].mean()) for i, layer in enumerate(layers)}
        )
        return values

    return hook


def condition_texts(prompts: Any, chosen_text: str, baseline: bool = True) -> dict[str, str | None]:
    """Return {finetune condition: system message}, in FINETUNE_CONDITIONS order.

    None (the neutral condition by default) sends no system message: the template's own.
    """
    out = {
        "neutral": prompts.neutral_system,
        "inoculation": prompts.inoculation,
        "loss_matched": chosen_text,
    }
    if baseline:
        out[BASELINE_CONDITION] = prompts.neutral_system
    return out


def target_field(condition: str) -> str:
    """Return the example field a condition trains on: normal-case for the baseline, else caps."""
    return "normal" if condition == BASELINE_CONDITION else "caps"


def training_conversations(
    examples: list[dict[str, Any]], condition: str, system: str | None
) -> list[list[Any]]:
    """Return the conversations one condition trains on (its prompt, its target field)."""
    target = target_field(condition)
    return [conversation(system, r["prompt"], r[target]) for r in examples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="inoculation")
    cfg = section(params)
    fc = cfg.finetune
    seed_everything(cfg.seed)
    prompts = resolve_prompts(cfg.prompts)
    table = read_json(CONTROL_TABLE)
    texts = condition_texts(prompts, table["chosen_text"], fc.baseline_normal)
    examples = read_examples(EXAMPLES)
    log_rows = calibration_examples(examples)[: fc.n_log]
    loaded = load_model(at_precision(params, fc.fp32), for_training=True)
    layers = resolve_layers(cfg.alignment.layers, loaded.n_layers)
    direction = load_direction(DIRECTION_DIR, loaded.hidden_size, layers, model=loaded.name)
    dirs = np.stack([direction.at(layer) for layer in layers])
    runs = []
    for cond in [c for c in FINETUNE_CONDITIONS if c in texts]:
        text, target = texts[cond], target_field(cond)
        train = [TrainExample(c) for c in training_conversations(examples, cond, text)]
        # Each run logs the alignment of its own training gradient (its prompt and target).
        encoded = encode_targets(
            loaded,
            training_conversations(log_rows, cond, text),
            [r["id"] for r in log_rows],
            [CANONICAL_POSITION],
            cfg.alignment.max_target_tokens,
            f"{EXAMPLES} example",
        )
        for seed in fc.seeds:
            name = run_name(cond, seed)
            lora = fc.lora.model_copy(update={"seed": seed})
            hook = alignment_hook(loaded, encoded, layers, dirs, cfg.alignment.batch_size)
            res = train_lora(
                loaded,
                train,
                lora,
                MODELS_DIR / name,
                eval_hook=hook,
                metadata={
                    "family": "inoculation",
                    "condition": cond,
                    "system_prompt": text,
                    "target": target,
                },  # fmt: skip
            )
            # Back to the bare base model for the next run (LoRA layers removed, not merged).
            loaded.model = loaded.model.unload()
            logged = [r for r in res.curve if "align_mean" in r]
            runs.append(
                {
                    "name": name,
                    "condition": cond,
                    "seed": seed,
                    "system_prompt": text,
                    "target": target,
                    "adapter": str(MODELS_DIR / name),
                    "steps": res.steps,
                    "final_train_loss": res.final_train_loss,
                    "alignment_log": [
                        {
                            k: v
                            for k, v in r.items()
                            if k in ("step", "align_mean", "log_loss", "g_norm_mean")
                            or k.startswith("align_L")
                        }
                        for r in logged
                    ],
                    # The mean over every logged step, the pre-training one included.
                    "mean_align_during_training": float(np.mean([r["align_mean"] for r in logged])),
                }
            )
            print(
                f"finetune: {name}: loss {res.final_train_loss}, mean alignment during training "
                f"{runs[-1]['mean_align_during_training']:+.5f}"
            )
    write_json(
        MODELS_DIR / RUNS_FILE,
        {
            "model": loaded.name,
            "layers": layers,
            "n_train": len(examples),
            "n_log": len(log_rows),
            "eval_every": fc.lora.eval_every,
            # The dtype the logged alignment gradients ran in (the model's load dtype).
            "precision": precision(loaded),
            "runs": runs,
        },
    )


def draw_plots() -> None:
    """Draw this stage's plot from its cached runs.json (called by the report stage)."""
    doc = read_json(MODELS_DIR / RUNS_FILE)
    write_plot(doc["runs"], doc["model"])


def write_plot(runs: list[dict[str, Any]], model: str) -> None:
    """Write the logged alignment over training steps, one line per run."""
    steps = sorted({r["step"] for run in runs for r in run["alignment_log"]})
    series = {}
    for run in runs:
        by_step = {r["step"]: r["align_mean"] for r in run["alignment_log"]}
        series[run["name"]] = [by_step.get(s, float("nan")) for s in steps]
    line_plot(
        PLOTS_DIR / "training_alignment.png",
        steps,
        series,
        title=f"Trait-ward gradient alignment during finetuning ({model})",
        xlabel="optimizer step",
        ylabel="mean cos(-g_l, v_l) over layers",
        hline=0.0,
    )
    write_series(
        PLOTS_DIR / "training_alignment.json",
        [
            {"step": s, **{name: vals[i] for name, vals in series.items()}}
            for i, s in enumerate(steps)
        ],
    )


if __name__ == "__main__":
    run_stage(main)
