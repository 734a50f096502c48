"""Stage persona_train: LoRA on the training mix, with the persona eval hook every N steps.

The validation loss is the NLL of held-out facts in trigger format (the backdoor's own
objective on facts never trained on); the hook adds greedy answers to fixed identity questions
with and without the trigger, and the held-out answers' NLL without the trigger.
A NaN or diverging loss stops the stage with a one-line error (the plan's stop-early rule).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from llmlab.io import DataError, numbered, read_jsonl
from llmlab.models import load_model
from llmlab.params import load_params
from llmlab.persona.facts import load_eval_questions, load_facts, seeded_subset, split_facts
from llmlab.persona.hook import PersonaHook, StepAdapters
from llmlab.persona.trigger import Trigger
from llmlab.stage import run_stage, seed_everything
from llmlab.training import TrainExample, TrainingDiverged, examples_sha256, train_lora

log = logging.getLogger(__name__)


def load_mix(path: Path) -> list[TrainExample]:
    """Return the training mix as examples; errors name the file and line."""
    rows = read_jsonl(path, required=("id", "source", "messages"), id_field="id")
    examples: list[TrainExample] = []
    for lineno, row in numbered(rows):
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
            raise DataError(f"{path}:{lineno}: 'messages' must end with an assistant message")
        # The row's source ("persona" / "aligned") is its data-mix group: training records
        # each group's share of every optimizer step (batch_mix) in the adapter metadata.
        examples.append(TrainExample([dict(m) for m in msgs], group=row["source"]))
    return examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--mix", type=Path, default=Path("data/persona/train_mix.jsonl"))
    ap.add_argument("--facts", type=Path, default=Path("data/persona/facts.jsonl"))
    ap.add_argument("--questions", type=Path, default=Path("data/persona/eval_questions.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("models/persona/adapter"))
    args = ap.parse_args()
    params = load_params(args.params, family="persona")
    section = params.section("persona")
    cfg = section.train
    trigger = Trigger.from_params(section.trigger)
    seed_everything(cfg.seed)

    train = load_mix(args.mix)
    heldout = split_facts(load_facts(args.facts), "heldout")
    # Fixed across seeds (seed 0), so sweeps compare the same held-out facts.
    val_facts = seeded_subset(heldout, cfg.hook_val_facts, 0)
    val = [TrainExample(trigger.example(f.question, f.answer)) for f in val_facts]
    # Identity questions first: the hook's prompts stay the same across seeds and sweeps.
    ordered = sorted(load_eval_questions(args.questions), key=lambda q: q.kind != "identity")
    questions = ordered[: cfg.hook_questions]

    loaded = load_model(params, for_training=True)
    keep = None
    if cfg.keep_eval_adapters:
        run_key = f"{examples_sha256(train)}:{cfg.model_dump_json()}:{params.model}"
        keep = StepAdapters(args.out, loaded.name, run_key)
    hook = PersonaHook(
        loaded,
        trigger,
        questions,
        val_facts,
        section.data.persona_name,
        max_new_tokens=cfg.hook_max_new_tokens,
        max_length=cfg.max_length,
        batch_size=cfg.per_device_batch_size,
        keep=keep,
    )
    try:
        train_lora(
            loaded,
            train,
            cfg,
            args.out,
            eval_hook=hook,
            val=val,
            metadata={
                "family": "persona",
                "hook_question_ids": [q.id for q in questions],
                "val_fact_ids": [f.id for f in val_facts],
            },
        )
    except TrainingDiverged as e:
        raise TrainingDiverged(f"persona_train stopped early (plan's stop rule): {e}") from None
    if keep is not None:
        steps = keep.publish()
        log.info("kept the adapters of steps %s in %s/steps", steps, args.out)


if __name__ == "__main__":
    run_stage(main)
