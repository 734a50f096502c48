"""Stage introspection_train@<variant>: one LoRA adapter per variant of the plan's table.

Every variant shares the seed, learning rate, warmup, gradient accumulation and gradient
clipping; rank and alpha come from the variant. The loss covers only the one-token answer.
Validation accuracy (against the training labels and against the true labels) and the label
NLL are recorded in the curve before the first step, every `eval_every` steps and at the end.
With `train.select_checkpoint: best_val_accuracy` the adapter written is the evaluation's with
the highest validation accuracy (checkpoint.py). A variant with `hub_adapter` is imported, not
trained (hub_adapter.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.introspection.checkpoint import BestCheckpoint
from llmlab.introspection.examples import Row, read_rows, row_steer, training_examples
from llmlab.introspection.scoring import choice_scores, yes_no_choices
from llmlab.introspection.vectors import VectorBank, load_vectors
from llmlab.io import DataError
from llmlab.models import LoadedModel
from llmlab.training import LoraTrainConfig, train_lora


def val_metrics(
    loaded: LoadedModel, bank: VectorBank, rows: Sequence[Row], batch_size: int
) -> dict[str, float]:
    """Return validation accuracy (training and true labels), label NLL and mean P(yes)."""
    prompts = [r["messages"][:-1] for r in rows]
    specs = [row_steer(loaded, bank, r["messages"], r.get("steer")) for r in rows]
    choices = yes_no_choices(loaded)
    prefixes = {r.get("answer_prefix", "") for r in rows}
    if len(prefixes) != 1:
        raise DataError(f"validation rows mix answer prefixes {sorted(prefixes)}")
    scores = choice_scores(
        loaded, prompts, [choices] * len(rows), specs, batch_size, prefix=prefixes.pop()
    )
    said_yes = np.array([lp[0] > lp[1] for lp in scores.logprobs])
    label_yes = np.array([r["label"] == "yes" for r in rows])
    true_yes = np.array([r["true_label"] == "yes" for r in rows])
    p_yes = np.array([scores.normalised(i)[0] for i in range(len(rows))])
    nll = [-(lp[0] if y else lp[1]) for lp, y in zip(scores.logprobs, label_yes, strict=True)]
    return {
        "val_accuracy": float(np.mean(said_yes == label_yes)),
        "val_accuracy_true_labels": float(np.mean(said_yes == true_yes)),
        "val_label_nll": float(np.mean(nll)),
        "val_p_yes": float(np.mean(p_yes)),
        "val_choice_mass": float(np.mean(scores.mass)),
    }


def variant_config(lora: LoraTrainConfig, rank: int, alpha: float) -> LoraTrainConfig:
    """Return the shared LoRA settings with the variant's rank and alpha."""
    return lora.model_copy(update={"rank": rank, "alpha": alpha})


def main() -> None:
    from llmlab.models import load_model
    from llmlab.params import ParamsError, load_params
    from llmlab.stage import seed_everything

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--datasets", default="data/introspection/datasets")
    ap.add_argument("--vectors", default="data/introspection/vectors")
    ap.add_argument("--out", default="models/introspection")
    args = ap.parse_args()
    params = load_params(args.params, family="introspection")
    cfg = params.section("introspection")
    if args.variant not in cfg.variants:
        raise ParamsError(
            f"{params.path}: introspection.variants: no variant {args.variant!r} "
            f"(have {sorted(cfg.variants)})"
        )
    variant = cfg.variants[args.variant]
    lora = variant_config(cfg.train.lora, variant.rank, variant.alpha)
    seed_everything(lora.seed)
    data_dir = Path(args.datasets) / args.variant
    train_rows = read_rows(data_dir / "train.jsonl", required=("id", "messages", "label"))
    val_rows = read_rows(data_dir / "val.jsonl", required=("id", "messages", "label", "true_label"))
    out_dir = Path(args.out) / args.variant
    metadata = {
        "family": "introspection",
        "variant": args.variant,
        "variant_config": variant.model_dump(mode="json"),
        "n_train_rows": len(train_rows),
        "n_val_rows": len(val_rows),
        "loss": "label token after the answer prefix, yes vs no"
        if train_rows[0].get("answer_prefix")
        else "first answer token only",
    }
    if variant.hub_adapter is not None:
        import_variant(params, args.variant, out_dir, metadata, args.vectors, val_rows, cfg)
        return
    loaded = load_model(params, for_training=True)
    bank = load_vectors(args.vectors, loaded)
    train = training_examples(loaded, bank, train_rows, context_gradient=cfg.train.context_gradient)
    best = (
        BestCheckpoint(out_dir, "val_accuracy")
        if cfg.train.select_checkpoint == "best_val_accuracy"
        else None
    )

    def hook(model: Any, step: int) -> dict[str, float]:
        view = dataclasses.replace(loaded, model=model)
        values = val_metrics(view, bank, val_rows, cfg.train.val_batch_size)
        if best is not None:
            best.observe(model, step, values)
        return values

    result = train_lora(loaded, train, lora, out_dir, eval_hook=hook, metadata=metadata)
    if best is not None and is_main_process():
        best.apply(out_dir, result.steps)


def is_main_process() -> bool:
    """Return whether this is the process that writes outputs (the only one without a launcher)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def import_variant(
    params: Any,
    variant: str,
    out_dir: Path,
    metadata: dict[str, Any],
    vectors: str,
    val_rows: Sequence[Row],
    cfg: Any,
) -> None:
    """Write a published adapter as the variant, scored on the variant's validation rows.

    The stage's dvclive folder is a declared out: it says that no training ran.
    """
    from llmlab.introspection.hub_adapter import import_adapter
    from llmlab.io import write_json
    from llmlab.live import live_dir

    def score(loaded: LoadedModel) -> dict[str, float]:
        bank = load_vectors(vectors, loaded)
        return val_metrics(loaded, bank, val_rows, cfg.train.val_batch_size)

    meta = import_adapter(params, variant, out_dir, metadata, score)
    live = live_dir(out_dir)
    if live is not None:
        write_json(live / "status.json", {"trained": False, "imported_from": meta["imported_from"]})


if __name__ == "__main__":
    from llmlab.stage import run_stage

    run_stage(main)
