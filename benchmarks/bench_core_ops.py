"""Gradient alignment, steering overhead and batched generation, against same-run baselines.

- gradients: dL/dh at 8 layers for every example (llmlab.gradients, length-sorted batches under
  a token budget, right padding) vs a baseline that retains every hidden state via
  output_hidden_states and calls autograd on all of them (unsorted fixed batches). MFU counts
  2 x (all decoder-layer params) for the forward plus 2 x (params of the layers from the
  shallowest requested one up) for the input-gradient backward, per real token.
- steering: generate with a steering hook on 1 layer (prompt + decode) vs unsteered, the two
  interleaved over --steer-repeats rounds (medians), so run order and clock drift cancel.
- generation: llmlab.generation (length-grouped, token-budget batches) vs padded `generate`
  over unsorted fixed batches.
Inputs are a long-tailed mix of prompt lengths.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_activations import make_items  # noqa: E402
from common import SHAPES, device_name, random_loaded, report  # noqa: E402

from llmlab.chat import collate, encode_chat, token_budget_batches  # noqa: E402
from llmlab.generation import generate  # noqa: E402
from llmlab.gradients import residual_gradients  # noqa: E402
from llmlab.layers import resolve_layers  # noqa: E402
from llmlab.models import decoder_layers, load_model  # noqa: E402
from llmlab.steering import steer  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, float]:
    """Return (seconds, peak GiB on GPU or nan)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    fn()
    sync()
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return time.perf_counter() - t, mem


def with_answers(items):
    return [
        [*it.messages, {"role": "assistant", "content": "Sure. Here is a short answer to that."}]
        for it in items
    ]


def layer_params(model, first: int, last: int) -> int:
    """Return the parameters of decoder layers first..last."""
    return sum(
        p.numel() for layer in decoder_layers(model)[first : last + 1] for p in layer.parameters()
    )


def bench_gradients(
    loaded, convs, batch_size, grad_tokens, peak_tflops, skip_baseline=False, baseline_n=None
):
    layers = resolve_layers([i / 9 for i in range(1, 9)], loaded.n_layers)
    tok = loaded.tokenizer
    enc = [encode_chat(tok, c, chat=loaded.chat) for c in convs]
    lengths = [len(e.input_ids) for e in enc]
    tokens = sum(lengths)
    base_enc = enc[:baseline_n] if baseline_n else enc
    base_tokens = sum(len(e.input_ids) for e in base_enc)
    batches = token_budget_batches(lengths, 256, grad_tokens)
    n_all = loaded.n_layers - 1
    flops_per_token = 2 * layer_params(loaded.model, 0, n_all) + 2 * layer_params(
        loaded.model, min(layers), n_all
    )

    def ours():
        for rows in batches:
            b = collate([enc[i] for i in rows], tok.pad_token_id, "right")
            residual_gradients(loaded, b, layers, ["pre_assistant"])

    def baseline():
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        emb = loaded.model.get_input_embeddings()
        for s in range(0, len(base_enc), batch_size):
            b = collate(base_enc[s : s + batch_size], tok.pad_token_id, "right").to(loaded.device)
            x = emb(b.input_ids).detach().requires_grad_(True)
            out = loaded.model(
                inputs_embeds=x,
                attention_mask=b.attention_mask,
                labels=b.labels,
                output_hidden_states=True,
            )
            hs = [out.hidden_states[i + 1] for i in layers]
            for h in hs:
                h.retain_grad()
            out.loss.backward()

    # warm-up: one small batch of each (kernels, allocator), untimed
    b0 = collate(enc[:2], tok.pad_token_id, "right")
    residual_gradients(loaded, b0, layers, ["pre_assistant"])
    runs = [(f"llmlab residual_gradients, sorted, <= {grad_tokens} tokens/batch", ours)]
    if not skip_baseline:
        runs.insert(
            0,
            (
                f"baseline: output_hidden_states + retain_grad, unsorted batches of {batch_size}",
                baseline,
            ),
        )
    rows = []
    for name, fn in runs:
        secs, mem = timed(fn)
        n_tok = base_tokens if name.startswith("baseline") else tokens
        tps = n_tok / secs
        rows.append(
            {
                "op": "gradients (8 layers)",
                "method": name,
                "tokens": n_tok,
                "seconds": secs,
                "tokens/s": tps,
                "MFU %": 100 * tps * flops_per_token / (peak_tflops * 1e12)
                if torch.cuda.is_available()
                else "",
                "peak GiB": mem,
            }
        )
    for r in rows:
        r["ratio"] = r["tokens/s"] / rows[0]["tokens/s"]
    return rows


def bench_steering(loaded, convs, batch_size, new_tokens, max_tokens, repeats):
    """Interleave unsteered and steered generate; return rows with median times."""
    vec = torch.randn(loaded.hidden_size)

    def run(steered: bool) -> None:
        def factory(rows, mask):
            return steer(loaded.layers, [loaded.n_layers // 2], vec, scale=2.0)

        generate(
            loaded,
            convs,
            max_new_tokens=new_tokens,
            batch_size=batch_size,
            max_tokens_per_batch=max_tokens,
            progress=False,
            steer=factory if steered else None,
            min_new_tokens=new_tokens,
        )

    run(False)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    mems: dict[bool, float] = {False: 0.0, True: 0.0}
    for r in range(repeats):
        # alternate which goes first in each round
        for steered in (False, True) if r % 2 == 0 else (True, False):
            secs, mem = timed(lambda steered=steered: run(steered))
            times[steered].append(secs)
            mems[steered] = max(mems[steered], mem)
    out_tokens = len(convs) * new_tokens
    med = {k: float(torch.tensor(v).median()) for k, v in times.items()}
    rows = []
    for steered, name in (
        (False, "llmlab generate, unsteered"),
        (True, "llmlab generate + steering (1 layer)"),
    ):
        rows.append({
            "op": f"steering ({new_tokens} new, {repeats} interleaved rounds, median)", "method": name,
            "tokens": out_tokens, "seconds": med[steered], "tokens/s": out_tokens / med[steered],
            "MFU %": "", "peak GiB": mems[steered], "ratio": med[False] / med[steered],
            "all seconds": " ".join(f"{t:.2f}" for t in times[steered]),
        })  # fmt: skip
    rows[1]["steering overhead %"] = 100 * (med[True] / med[False] - 1)
    rows[0]["steering overhead %"] = ""
    return rows


def bench_generation(loaded, convs, batch_size, new_tokens, max_tokens):
    tok = loaded.tokenizer

    def baseline():
        for s in range(0, len(convs), batch_size):
            enc = [encode_chat(tok, c, chat=loaded.chat) for c in convs[s : s + batch_size]]
            b = collate(enc, tok.pad_token_id, "left").to(loaded.device)
            with torch.no_grad():
                loaded.model.generate(
                    input_ids=b.input_ids,
                    attention_mask=b.attention_mask,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )

    def ours(steered: bool = False):
        def factory(rows, mask):
            return steer(
                loaded.layers, [loaded.n_layers // 2], torch.randn(loaded.hidden_size), scale=2.0
            )

        generate(
            loaded,
            convs,
            max_new_tokens=new_tokens,
            batch_size=batch_size * 4,
            max_tokens_per_batch=max_tokens,
            progress=False,
            steer=factory if steered else None,
            min_new_tokens=new_tokens,
        )

    out_tokens = len(convs) * new_tokens
    rows = []
    for name, fn in (
        ("baseline: padded generate, unsorted fixed batches", baseline),
        ("llmlab generate", ours),
        ("llmlab generate + steering (1 layer)", lambda: ours(True)),
    ):
        secs, mem = timed(fn)
        rows.append(
            {
                "op": f"generation ({new_tokens} new)",
                "method": name,
                "tokens": out_tokens,
                "seconds": secs,
                "tokens/s": out_tokens / secs,
                "peak GiB": mem,
            }
        )
    for r in rows:
        r["ratio"] = rows[0]["seconds"] / r["seconds"]
    rows[2]["steering overhead %"] = 100 * (rows[2]["seconds"] / rows[1]["seconds"] - 1)
    rows[0]["steering overhead %"] = rows[1]["steering overhead %"] = ""
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=["embedded", *SHAPES], default="embedded")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for random-shape models")
    ap.add_argument("--n-grad", type=int, default=32)
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--max-len", type=int, default=1000)
    ap.add_argument(
        "--grad-tokens",
        default="8192",
        help="llmlab gradient token budget(s) per batch, comma-separated",
    )
    ap.add_argument(
        "--profile", action="store_true", help="print the top CUDA kernels of one gradient batch"
    )
    ap.add_argument("--n-steer", type=int, default=64)
    ap.add_argument("--steer-repeats", type=int, default=3)
    ap.add_argument("--ops", default="gradients,steering,generation", help="comma-separated subset")
    ap.add_argument("--skip-grad-baseline", action="store_true")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="after the eager gradient runs, repeat them with norms and MLPs compiled",
    )
    ap.add_argument(
        "--grad-baseline-n", type=int, default=None, help="gradient baseline on the first N only"
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="bf16 matmul peak for MFU (default: measured in this run)",
    )
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shape == "embedded":
        from conftest_shim import embedded_params

        loaded = load_model(embedded_params())
    else:
        from transformers import AutoTokenizer

        loaded = random_loaded(args.shape, AutoTokenizer.from_pretrained(args.tokenizer), device)
    ops = set(args.ops.split(","))
    if device == "cuda" and args.peak_tflops is None:
        from common import matmul_tflops

        args.peak_tflops = matmul_tflops()
        print(f"measured bf16 matmul: {args.peak_tflops:.0f} TFLOP/s", flush=True)
    elif args.peak_tflops is None:
        args.peak_tflops = float("nan")
    rows = []
    if "gradients" in ops:
        grad_convs = with_answers(make_items(loaded.tokenizer, args.n_grad, seed=1))
        for k, budget in enumerate(int(b) for b in args.grad_tokens.split(",")):
            got = bench_gradients(
                loaded,
                grad_convs,
                args.batch_size,
                budget,
                args.peak_tflops,
                args.skip_grad_baseline or k > 0,
                args.grad_baseline_n,
            )
            if k > 0 and rows:
                for r in got:
                    r["ratio"] = r["tokens/s"] / rows[0]["tokens/s"]
            rows += got
            print(rows[-1], flush=True)
        if args.compile:
            from llmlab.fused import compile_elementwise

            t0 = time.perf_counter()
            compile_elementwise(loaded.model)
            print(f"compiled norms and MLPs in {time.perf_counter() - t0:.1f}s", flush=True)
            for budget in (int(b) for b in args.grad_tokens.split(",")):
                got = bench_gradients(
                    loaded, grad_convs, args.batch_size, budget, args.peak_tflops, True
                )
                for r in got:
                    r["method"] += ", norms + MLP compiled"
                    r["ratio"] = r["tokens/s"] / rows[0]["tokens/s"]
                rows += got
                print(rows[-1], flush=True)
        if args.profile and torch.cuda.is_available():
            from common import profile_top

            layers = resolve_layers([i / 9 for i in range(1, 9)], loaded.n_layers)
            enc = [encode_chat(loaded.tokenizer, c, chat=True) for c in grad_convs]
            enc.sort(key=lambda e: -len(e.input_ids))
            n = max(
                1, int(args.grad_tokens.split(",")[0]) // max(len(enc[len(enc) // 2].input_ids), 1)
            )
            mid = enc[len(enc) // 2 : len(enc) // 2 + n]
            b = collate(mid, loaded.tokenizer.pad_token_id, "right")
            print(f"profile: one batch {tuple(b.input_ids.shape)}", flush=True)
            print(
                profile_top(lambda: residual_gradients(loaded, b, layers, ["pre_assistant"])),
                flush=True,
            )
    if "steering" in ops:
        steer_convs = [it.messages for it in make_items(loaded.tokenizer, args.n_steer, seed=3)]
        rows += bench_steering(
            loaded,
            steer_convs,
            args.batch_size * 4,
            args.new_tokens,
            args.max_tokens,
            args.steer_repeats,
        )
        print(rows[-1], flush=True)
    if "generation" in ops:
        gen_convs = [it.messages for it in make_items(loaded.tokenizer, args.n_gen, seed=2)]
        rows += bench_generation(
            loaded, gen_convs, args.batch_size, args.new_tokens, args.max_tokens
        )
    for r in rows:
        r["device"] = device_name()
        r["model"] = loaded.name
    report(f"Core ops ({args.shape}, {device})", rows, append=not args.no_append)


if __name__ == "__main__":
    main()
