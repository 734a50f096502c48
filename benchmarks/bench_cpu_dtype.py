"""The embedded model on CPU in float32 (the baseline) and bfloat16: the three passes the default
pipeline spends its time in, through the library's own loader and generate.

Rows, both dtypes in one process, each the best of --reps timings after one warm-up:
- prefill: one no-grad forward of --batch rows x --tokens tokens (scoring, capture, judging);
- generate: llmlab.generation.generate, greedy, --batch chat prompts x --new-tokens tokens;
- train step: forward + backward of the model with a rank-8 LoRA on all projections on
  --train-batch rows x --tokens tokens (the families' finetunes).
The last columns say how far bfloat16's prefill logits are from float32's on the same inputs:
the largest absolute difference, and the share of positions whose top token is the same. Usage: python benchmarks/bench_cpu_dtype.py   (params.yaml's model, CPU only)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from llmlab.generation import generate  # noqa: E402
from llmlab.models import load_model  # noqa: E402
from llmlab.params import DEFAULT_PARAMS, parse_params  # noqa: E402


def best_of(fn, reps: int) -> float:
    """Return the shortest of `reps` timings of fn() after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def load_on_cpu(raw: dict, dtype: str):  # noqa: ANN201
    """Return params.yaml's model loaded by llmlab on the CPU in `dtype` (raw: the params)."""
    raw["runtime"].update(device="cpu", dtype=dtype)
    params = parse_params(raw)
    return params, load_model(params)


def topic_prompts(n: int) -> list[list[dict[str, str]]]:
    """Return n short one-turn chat prompts."""
    return [
        [{"role": "user", "content": f"Write about topic number {k} in a few sentences."}]
        for k in range(n)
    ]


def generate_seconds(loaded, prompts, new_tokens: int, reps: int) -> float:  # noqa: ANN001
    """Return the best of `reps` timings of llmlab's greedy generate, all prompts in one batch."""
    return best_of(
        lambda: generate(
            loaded,
            prompts,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            batch_size=len(prompts),
            progress=False,
        ),
        reps,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    gen = torch.Generator().manual_seed(0)
    rows, logits = [], {}
    for dtype in ("float32", "bfloat16"):
        params, loaded = load_on_cpu(raw, dtype)
        model = loaded.model.eval()
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=gen.manual_seed(0))
        with torch.no_grad():
            logits[dtype] = model(input_ids=ids).logits.float()
            prefill = best_of(lambda m=model, x=ids: m(input_ids=x, logits_to_keep=1), args.reps)
        gen_s = generate_seconds(loaded, topic_prompts(args.batch), args.new_tokens, args.reps)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lora).train()
        x = ids[: args.train_batch]

        def step(m=peft_model, x=x) -> None:
            m(input_ids=x, labels=x).loss.backward()
            m.zero_grad(set_to_none=True)

        train_s = best_of(step, args.reps)
        tokens = args.batch * args.tokens
        rows.append(
            {
                "dtype": dtype,
                "prefill s": round(prefill, 3),
                "prefill tokens/s": round(tokens / prefill),
                "generate s": round(gen_s, 2),
                "output tokens/s": round(args.batch * args.new_tokens / gen_s),
                "train step s": round(train_s, 3),
                "train tokens/s": round(args.train_batch * args.tokens / train_s),
                "threads": torch.get_num_threads(),
            }
        )
        del peft_model, model, loaded
    for key in ("prefill tokens/s", "output tokens/s", "train tokens/s"):
        rows[1][f"{key.split()[0]} x"] = round(rows[1][key] / rows[0][key], 2)
    diff = (logits["bfloat16"] - logits["float32"]).abs().max().item()
    rows[1]["max |logit diff| vs fp32"] = round(diff, 3)
    agree = (logits["bfloat16"].argmax(-1) == logits["float32"].argmax(-1)).float().mean().item()
    rows[1]["top-1 agreement vs fp32"] = round(agree, 4)
    report(
        f"Embedded model on CPU: float32 vs bfloat16 ({params.model}, prefill {args.batch} x "
        f"{args.tokens}, generate {args.batch} x {args.new_tokens} new, train {args.train_batch} "
        f"x {args.tokens})",
        rows,
        append=not args.no_append,
    )


if __name__ == "__main__":
    main()
