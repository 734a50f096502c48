"""The LM head's input on CPU: the strided last-position slice (transformers as it is, the
baseline) against the contiguous copy `llmlab.models.contiguous_output_embedding_input` hands it.

With `logits_to_keep=1` (every generation prefill, choice scoring) transformers multiplies
`hidden_states[:, -1:, :]`, a strided view, by the head's weight. PyTorch's CPU kernel for that
product is far slower when the weight does not require grad, which is the case for a frozen base
model under a LoRA adapter. Rows, per dtype, each the best of --reps timings after one warm-up:
- prefill: one no-grad forward of --batch rows x --tokens tokens, logits of the last position;
- generate: llmlab.generation.generate, greedy, --batch prompts x --new-tokens tokens;
each with the weights frozen (as under an adapter) and the hook removed (baseline) or kept, and a
prefill with the weights requiring grad, hook removed (how a plain load_model runs). The last
column is the largest logit difference of the hooked prefill from the baseline's.
Usage: python benchmarks/bench_lm_head.py   (params.yaml's model, CPU only)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_dtype import best_of, generate_seconds, load_on_cpu, topic_prompts  # noqa: E402
from common import report  # noqa: E402

from llmlab.models import contiguous_output_embedding_input  # noqa: E402
from llmlab.params import DEFAULT_PARAMS  # noqa: E402


def unhook(model) -> None:
    """Remove the contiguous-input hook: the head as transformers builds it."""
    head = model.get_output_embeddings()
    head._forward_pre_hooks.clear()
    head._llmlab_contiguous_input = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    gen = torch.Generator().manual_seed(0)
    rows = []
    prompts = topic_prompts(args.batch)
    for dtype in ("float32", "bfloat16"):
        params, loaded = load_on_cpu(raw, dtype)
        model = loaded.model.eval()
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=gen.manual_seed(0))

        def prefill(m=model, x=ids) -> torch.Tensor:
            with torch.no_grad():
                return m(input_ids=x, logits_to_keep=1).logits.float()

        def gen_s(lm=loaded) -> float:
            return generate_seconds(lm, prompts, args.new_tokens, args.reps)

        timings = {}
        unhook(model)
        timings["weights require grad, strided input"] = (best_of(prefill, args.reps), None)
        model.requires_grad_(False)
        base_logits = prefill()
        timings["frozen, strided input (baseline)"] = (best_of(prefill, args.reps), gen_s())
        contiguous_output_embedding_input(model)
        diff = (prefill() - base_logits).abs().max().item()
        timings["frozen, contiguous input (hook)"] = (best_of(prefill, args.reps), gen_s())
        baseline = timings["frozen, strided input (baseline)"]
        for name, (pre, g) in timings.items():
            rows.append(
                {
                    "dtype": dtype,
                    "lm head input": name,
                    "prefill s": round(pre, 3),
                    "prefill x": round(baseline[0] / pre, 2),
                    "generate s": "" if g is None else round(g, 2),
                    "generate x": "" if g is None else round(baseline[1] / g, 2),
                    "max |logit diff| vs baseline": f"{diff:.1e}" if "hook" in name else "",
                    "threads": torch.get_num_threads(),
                }
            )
        del model, loaded
    report(
        f"LM head input on CPU ({params.model}, prefill {args.batch} x {args.tokens}, generate "
        f"{args.batch} x {args.new_tokens} new)",
        rows,
        append=not args.no_append,
    )


if __name__ == "__main__":
    main()
