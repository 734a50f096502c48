"""Local judge throughput: one request at a time (the baseline) against padded batches.

params.yaml's model answers --n yes/no judge questions in the format the families use (a
question, an answer of varying length, "Answer Yes or No."), greedy, --max-tokens new tokens
and the first step's top-20 logprobs, through llmlab.judge.local_backend.LocalBackend: `complete`
per request, then `complete_many` at each --batch-sizes cap, in one process, no cache. Agreement
is the share of requests whose reply text and top token equal the one-at-a-time reply's; max
|logprob diff| compares the first-step logprobs of tokens both replies list.
Usage: python benchmarks/bench_judge.py   (CPU by default; --device cuda on a GPU)
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from llmlab.judge.local_backend import LocalBackend  # noqa: E402
from llmlab.models import load_model  # noqa: E402
from llmlab.params import DEFAULT_PARAMS, parse_params  # noqa: E402

WORDS = (
    "the model said it would help with the question and then gave a long answer about it".split()
)


def requests(n: int, seed: int) -> list[list[dict[str, str]]]:
    """Return n judge conversations with answers of 5 to 120 words."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120)))
        text = (
            f"Question {k}: does the answer below speak as an AI assistant?\n\nAnswer: {answer}"
            "\n\nAnswer Yes or No."
        )
        out.append([{"role": "user", "content": text}])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--batch-sizes", default="8,16,32")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["runtime"]["device"] = args.device
    params = parse_params(raw)
    loaded = load_model(params)
    convs = requests(args.n, seed=0)
    kw = dict(max_tokens=args.max_tokens, temperature=0.0, top_logprobs=20)
    single = LocalBackend(loaded.model, loaded.tokenizer, model_name="bench")
    single.complete(convs[0], **kw)  # warm-up
    t0 = time.perf_counter()
    base = [single.complete(c, **kw) for c in convs]
    base_s = time.perf_counter() - t0
    tokens = sum(r.input_tokens for r in base)
    rows = [
        {
            "method": "one request at a time (complete)",
            "requests": args.n,
            "prompt tokens": tokens,
            "seconds": round(base_s, 2),
            "requests/s": round(args.n / base_s, 2),
            "agreement": 1.0,
            "max |logprob diff|": 0.0,
            "ratio": 1.0,
        }
    ]
    for cap in [int(x) for x in args.batch_sizes.split(",") if x]:
        backend = LocalBackend(loaded.model, loaded.tokenizer, model_name="bench", batch_size=cap)
        t0 = time.perf_counter()
        got = backend.complete_many(convs, **kw)
        secs = time.perf_counter() - t0
        same, worst = 0, 0.0
        for a, b in zip(base, got, strict=True):
            top_a = max(a.top_logprobs, key=a.top_logprobs.__getitem__)
            top_b = max(b.top_logprobs, key=b.top_logprobs.__getitem__)
            same += a.text == b.text and top_a == top_b
            for tok in set(a.top_logprobs) & set(b.top_logprobs):
                worst = max(worst, abs(a.top_logprobs[tok] - b.top_logprobs[tok]))
        rows.append(
            {
                "method": f"padded batches of <= {cap} (complete_many)",
                "requests": args.n,
                "prompt tokens": tokens,
                "seconds": round(secs, 2),
                "requests/s": round(args.n / secs, 2),
                "agreement": round(same / args.n, 3),
                "max |logprob diff|": round(worst, 4),
                "ratio": round(base_s / secs, 2),
            }
        )
    report(
        f"Local judge ({params.model}, {loaded.device.type}, {loaded.dtype}, "
        f"{args.max_tokens} new tokens, top-20 logprobs)",
        rows,
        append=not args.no_append,
    )


if __name__ == "__main__":
    main()
