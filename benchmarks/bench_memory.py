"""Peak GPU memory of a LoRA step with gradient checkpointing, measured and estimated.

For each model shape (random bf16 weights) and each (batch, sequence length): LoRA r=16 on all
projections (q, k, v, o, gate, up, down; dropout 0.05, adapters in fp32 as peft makes them),
non-reentrant gradient checkpointing, loss over the whole answer, fused AdamW on the adapters;
the same settings as llmlab.training.train_lora. Two optimizer steps are run (the second holds
the optimizer state) and the peak allocated memory is compared with the estimate

    weights (2 bytes/param) + adapters (16 bytes/param: fp32 value, gradient, two Adam moments)
    + checkpoints (layers x tokens x hidden x 2 bytes)
    + one layer's recomputed activations (tokens x ACT_BYTES(hidden, mlp))
    + logits (tokens x vocab x LOGIT_BYTES)

so a shape too large for the device can be sized from a measured smaller one. Usage:
    python benchmarks/bench_memory.py --shapes llama-3.1-8b,qwen2.5-32b --configs 4x256,1x2048,4x2048
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, device_name, random_shape_model, report  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
# bf16 logits, their fp32 upcast for the loss, the fp32 log-softmax kept for backward, and the
# gradient of the logits (fp32 then bf16)
LOGIT_BYTES = 2 + 4 + 4 + 4 + 2


def act_bytes(hidden: int, mlp: int, kv: int) -> int:
    """Return bytes per token of one decoder layer's activations kept for its backward (bf16).

    Norm inputs in fp32 (2 x 4h), attention q/k/v/out and rotary (~4h + 2kv), MLP gate, up and
    act (3 x 2 x mlp), LoRA inputs after dropout (6 x 2h + 2 mlp) and dropout masks (6h + mlp).
    """
    return (
        8 * hidden + 2 * (4 * hidden + 2 * kv) + 6 * mlp + 12 * hidden + 2 * mlp + 6 * hidden + mlp
    )


def lora_params(shape: dict) -> int:
    h, m = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = RANK * ((h + h) * 2 + (h + kv) * 2 + (h + m) * 3)
    return per_layer * shape["num_hidden_layers"]


def estimate_gib(shape: dict, n_params: int, batch: int, seq: int) -> float:
    h, m, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    t = batch * seq
    total = (
        2 * n_params
        + 16 * lora_params(shape)
        + n * t * h * 2
        + t * act_bytes(h, m, kv)
        + t * shape["vocab_size"] * LOGIT_BYTES
    )
    return total / 2**30


def measure(model, batch: int, seq: int, steps: int = 2) -> tuple[float, float, float]:
    """Return (peak allocated GiB, peak reserved GiB, seconds per step) of LoRA steps."""
    import time

    vocab = model.config.vocab_size
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), device="cuda")
        labels = ids.clone()
        labels[:, : seq // 4] = -100  # loss on the answer part only
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    secs = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    reserved = torch.cuda.max_memory_reserved() / 2**30
    del opt
    return peak, reserved, secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-3.1-8b,qwen2.5-32b")
    ap.add_argument("--configs", default="4x256,1x2048,4x2048", help="BATCHxSEQ, comma-separated")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    rows = []
    for shape in args.shapes.split(","):
        model = random_shape_model(shape, torch.bfloat16, "cuda")
        n_params = sum(p.numel() for p in model.parameters())
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model = get_peft_model(
            model,
            LoraConfig(r=RANK, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                       task_type="CAUSAL_LM"),
        )  # fmt: skip
        weights_gib = torch.cuda.memory_allocated() / 2**30
        for cfg in args.configs.split(","):
            b, s = (int(x) for x in cfg.split("x"))
            try:
                peak, reserved, secs = measure(model, b, s)
                err = ""
            except torch.OutOfMemoryError:
                peak = reserved = secs = float("nan")
                err = "out of memory"
            gc.collect()
            torch.cuda.empty_cache()
            est = estimate_gib(SHAPES[shape], n_params, b, s)
            rows.append({
                "model": shape, "params (B)": n_params / 1e9, "device": device_name(),
                "batch x seq": f"{b} x {s}", "grad ckpt": True,
                "weights + adapters GiB": weights_gib, "measured peak GiB": peak,
                "peak reserved GiB": reserved,
                "estimate GiB": est, "estimate / measured": est / peak if peak == peak else "",
                "fits 80 GB (reserved < 78 GiB)": "yes" if reserved < 78 else "no", "s/step": secs,
                "note": err,
            })  # fmt: skip
            print(rows[-1], flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    report("LoRA step memory (r=16 all projections, gradient checkpointing, bf16)", rows,
           append=not args.no_append)  # fmt: skip


if __name__ == "__main__":
    main()
