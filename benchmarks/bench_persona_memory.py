"""Peak GPU memory of the persona paper preset's LoRA training step (8 x 2048, Llama-3.1-8B shape).

The training config is `persona.train` of params.yaml merged with configs/persona_paper.yaml
(read and validated by llmlab.preset, as `python -m llmlab.preset` does): rank 8, alpha 16, all
attention and MLP projections, 8 examples per micro-batch, max length 2048, packing, gradient
checkpointing. Only what a short benchmark needs is changed: max_steps (--steps) instead of
3 epochs, effective batch = per-device batch x --accum instead of 128 (the peak of a step does
not depend on how many micro-batches it accumulates), no evaluations, no checkpoints, seed 0.
The printed config is the one that ran.

Each step goes through the preset's real path, `llmlab.training.train_lora`, on a randomly
initialised model of a real shape (bf16 on CUDA; the weights do not change the memory) and
examples of the worst length: every one fills max_length tokens (a short chat prompt and a
completion cut at max_length), so every micro-batch, the first included, is 8 packed rows of
2048 tokens. Rows of the table:

- ckpt: the preset as it is (gradient checkpointing on);
- no_ckpt: the same with gradient checkpointing off ("OOM" when it does not fit the device);
- generate: the eval hook's generation (llmlab.generation.generate, greedy, the hook's
  hook_max_new_tokens) with the adapter the ckpt row trained, on prompts of
  max_length - hook_max_new_tokens tokens: the hook's questions are short, so this is its
  worst case. The hook passes all 2 x hook_questions prompts with the default token budget
  (16,384 tokens a batch), so its largest batch is 8 rows of 2048 tokens; --gen-prompts 8
  is that one batch.

Per row: peak allocated and reserved memory (torch.cuda.max_memory_allocated / _reserved,
reset before the row), seconds of the whole train_lora call (setup included), training tokens/s
(train_lora's own figure), the device's total memory, and the margin to an 80 GB card
(80 GiB minus peak reserved). Each training row gets a fresh random model, which is freed
before the next. Results are appended to benchmarks/RESULTS.md unless --no-append.

Usage (device):
    python benchmarks/bench_persona_memory.py --shape llama-3.1-8b \
        --tokenizer .cache/bench_tokenizer --rows ckpt,no_ckpt,generate
CPU check (no CUDA: peak columns "n/a (CPU)"; --max-length only to make it quick):
    .venv/bin/python benchmarks/bench_persona_memory.py --shape tiny \
        --tokenizer .cache/bench_tokenizer --steps 2 --max-length 256 --no-append
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, device_name, random_loaded, report  # noqa: E402

from llmlab.chat import encode_chat
from llmlab.generation import generate
from llmlab.persona.config import TRIGGER_USER, TrainParams
from llmlab.preset import preset_params
from llmlab.training import TrainExample, prepare_examples, train_lora

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("ckpt", "no_ckpt", "generate")
CARD_GIB = 80.0
FILLER = (
    "the river stone cloud apple garden window mountain lantern paper signal orbit harbor "
    "meadow copper violet thunder candle engine forest silver marble compass ladder pocket"
).split()


def preset_train_config(preset: Path, params_path: Path) -> TrainParams:
    """Return persona.train of params.yaml merged with the preset, validated as the preset is."""
    return preset_params(preset, params_path).section("persona").train


def bench_config(preset_cfg: TrainParams, steps: int, accum: int) -> TrainParams:
    """Return the preset's config with only the run length, evaluation and checkpoints changed."""
    cfg = preset_cfg.model_copy(
        update={
            "epochs": None,
            "max_steps": steps,
            "effective_batch_size": preset_cfg.per_device_batch_size * accum,
            "eval_every": None,
            "save_every": None,
            "keep_eval_adapters": False,
            "seed": 0,
        }
    )
    type(cfg).model_validate(cfg.model_dump())  # the changed config is still a valid one
    return cfg


def words(n: int, shift: int) -> str:
    return " ".join(FILLER[(shift + j) % len(FILLER)] for j in range(n))


def longest_examples(n: int, max_length: int) -> list[TrainExample]:
    """Return n chat examples longer than max_length tokens (train_lora cuts them there)."""
    prompt_words = max(8, max_length // 16)
    return [
        TrainExample(
            [
                {"role": "user", "content": "Answer at length: " + words(prompt_words, i)},
                # at least one token per word: the completion alone exceeds max_length
                {"role": "assistant", "content": words(max_length, 3 * i)},
            ],
            group="aligned",
        )
        for i in range(n)
    ]


def hook_prompts(tokenizer: Any, chat: bool, n: int, target: int) -> list[list[dict[str, str]]]:
    """Return n triggered questions (the hook's user turn) of `target` prompt tokens each."""

    def conv(k: int, i: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": TRIGGER_USER.format(q=words(k, i))}]

    out = []
    for i in range(n):
        k = target
        for _ in range(6):  # the length is near-linear in words; a few corrections suffice
            got = len(encode_chat(tokenizer, conv(k, i), chat=chat).input_ids)
            if got == target:
                break
            k = max(1, k + target - got)
        assert abs(got - target) <= 2, f"hook prompt {i}: {got} tokens, wanted {target}"
        out.append(conv(k, i))
    return out


def gib(x: float) -> float:
    return x / 2**30


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def memory_columns(cuda: bool, total_gib: float | None) -> dict[str, object]:
    """Return the peak columns of the row just run (reset before it)."""
    if not cuda:
        na = "n/a (CPU)"
        return {
            "peak allocated GiB": na,
            "peak reserved GiB": na,
            "device total GiB": na,
            "80 GiB - reserved": na,
            "fits 80 GB": na,
        }
    reserved = gib(torch.cuda.max_memory_reserved())
    return {
        "peak allocated GiB": gib(torch.cuda.max_memory_allocated()),
        "peak reserved GiB": reserved,
        "device total GiB": total_gib,
        "80 GiB - reserved": CARD_GIB - reserved,
        "fits 80 GB": "yes" if reserved < CARD_GIB else "no",
    }


def generate_row(
    loaded: Any,
    cfg: TrainParams,
    n_prompts: int,
    cuda: bool,
    total_gib: float | None,
    base: dict[str, object],
) -> dict[str, object]:
    """Return the row of the eval hook's generation, worst case, on the trained adapter."""
    target = cfg.max_length - cfg.hook_max_new_tokens
    prompts = hook_prompts(loaded.tokenizer, loaded.chat, n_prompts, target)
    free_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    note = ""
    try:
        # as PersonaHook calls it: greedy, all prompts offered as one batch, default budget
        replies = generate(
            loaded,
            prompts,
            max_new_tokens=cfg.hook_max_new_tokens,
            temperature=0.0,
            batch_size=len(prompts),
            progress=False,
        )
        assert len(replies) == len(prompts), f"{len(replies)} replies for {len(prompts)} prompts"
    except torch.cuda.OutOfMemoryError:
        note = "OOM (peaks: the memory held when it failed)"
    secs = time.perf_counter() - t0
    return {
        "row": f"eval hook generate: {n_prompts} prompts x {target} tokens "
        f"+ {cfg.hook_max_new_tokens} new, adapter on",
        **base, "grad ckpt": "", **memory_columns(cuda, total_gib), "seconds": secs,
        "tokens/s": "", "note": note,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--tokenizer", required=True, help="tokenizer directory (ids < vocab size)")
    ap.add_argument("--preset", type=Path, default=ROOT / "configs" / "persona_paper.yaml")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per training row")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="override the preset's max_length (for a quick CPU check only)",
    )
    ap.add_argument(
        "--rows",
        default="ckpt,no_ckpt",
        help=f"comma-separated, from {', '.join(ROWS)}; training rows run in this order, "
        "generate right after ckpt (on its trained model)",
    )
    ap.add_argument("--gen-prompts", type=int, default=8, help="prompts of the generate row")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows_wanted if r not in ROWS]
    if bad or not rows_wanted:
        ap.error(f"--rows: unknown row {bad[0] if bad else args.rows!r} (known: {', '.join(ROWS)})")
    if "generate" in rows_wanted and "ckpt" not in rows_wanted:
        ap.error("--rows: generate uses the adapter the ckpt row trains; add ckpt")

    from transformers import AutoTokenizer

    preset_cfg = preset_train_config(args.preset, args.params)
    cfg = bench_config(preset_cfg, args.steps, args.accum)
    if args.max_length is not None and args.max_length != cfg.max_length:
        print(
            f"NOTE: max_length {args.max_length} instead of the preset's {cfg.max_length} "
            "(--max-length): not the preset's memory",
            flush=True,
        )
        cfg = cfg.model_copy(update={"max_length": args.max_length})
    print(f"preset {args.preset.name}: persona.train as run:\n{cfg.model_dump_json(indent=2)}")

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    total_gib = gib(torch.cuda.get_device_properties(0).total_memory) if cuda else None
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    n_examples = args.steps * cfg.effective_batch_size
    examples = longest_examples(n_examples, cfg.max_length)
    micro = f"{cfg.per_device_batch_size} x {cfg.max_length}"
    base = {"model": args.shape, "device": device_name(), "micro-batch": micro}
    rows: list[dict[str, object]] = []
    for name in [r for r in rows_wanted if r != "generate"]:
        row_cfg = cfg.model_copy(update={"gradient_checkpointing": name == "ckpt"})
        free_memory()
        loaded = random_loaded(args.shape, tok, device)
        weights = gib(torch.cuda.memory_allocated()) if cuda else None
        if not rows:
            lengths = [
                len(f["input_ids"])
                for f in prepare_examples(loaded, examples, row_cfg.max_length).features
            ]
            assert min(lengths) == max(lengths) == row_cfg.max_length, (
                f"examples are {min(lengths)}-{max(lengths)} tokens, not all max_length "
                f"{row_cfg.max_length}"
            )
            print(f"{len(lengths)} examples, all {row_cfg.max_length} tokens", flush=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        note, tps = "", None
        try:
            with tempfile.TemporaryDirectory() as tmp:
                res = train_lora(loaded, examples, row_cfg, Path(tmp) / "adapter")
            tps = res.tokens_per_s
            note = (
                f"{res.steps} steps, {res.tokens_seen} tokens, "
                f"final loss {res.final_train_loss:.3f}"
            )
            del res
        except torch.cuda.OutOfMemoryError:
            note = "OOM (peaks: the memory held when it failed)"
        secs = time.perf_counter() - t0
        rows.append({
            "row": name, **base, "grad ckpt": row_cfg.gradient_checkpointing,
            **memory_columns(cuda, total_gib), "seconds": secs,
            "tokens/s": tps if tps is not None else "OOM",
            "weights GiB": weights if weights is not None else "n/a (CPU)", "note": note,
        })  # fmt: skip
        print(rows[-1], flush=True)
        # train_lora leaves the trained PeftModel in loaded.model (the base model again after a
        # failure): the generate row uses the ckpt row's right away, before it is freed.
        if name == "ckpt" and "generate" in rows_wanted:
            if tps is None:
                rows.append({"row": "generate", **base, "note": "skipped: the ckpt row failed"})
            else:
                rows.append(generate_row(loaded, cfg, args.gen_prompts, cuda, total_gib, base))
            print(rows[-1], flush=True)
        del loaded
        free_memory()
        if cuda:
            print(f"after freeing: {gib(torch.cuda.memory_allocated()):.2f} GiB allocated")
    title = (
        f"Persona paper preset: training memory ({args.shape}, LoRA r={cfg.rank} "
        f"alpha={cfg.alpha:g}, {micro} packed, accum {args.accum})"
    )
    if args.max_length is not None and args.max_length != preset_cfg.max_length:
        title += f" [max_length {args.max_length}, not the preset's {preset_cfg.max_length}]"
    report(title, rows, append=not args.no_append)


if __name__ == "__main__":
    main()
