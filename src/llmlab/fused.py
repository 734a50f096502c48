"""Opt-in fused kernels for the elementwise parts of decoder layers (torch.compile).

In eager mode a Llama/Qwen decoder layer spends a third or more of its GPU time outside the
matrix products: the fp32 RMSNorm chain (upcast, square, mean, rsqrt, scale, downcast, weight)
and the SiLU-times-up product of the MLP each pass over the activations several times, and
their backward passes do the same again. `compile_elementwise` compiles each layer's norms and
MLP in place with dynamic shapes, so each chain becomes one fused kernel while the matrix
products stay cuBLAS calls; on an H200 this took activation capture from 59% to 68% of the
measured matmul rate and residual gradients from 15.1k to 18.9k tokens/s (benchmarks/RESULTS.md).

Fused reductions round differently from the eager ones, so values agree to bf16 rounding, not
bit for bit; it is therefore off unless a caller asks for it. The first batches of each new
shape class pay the compilation (seconds). Forward hooks on the decoder layers (capture,
gradients, steering) keep working: they sit outside the compiled modules.
"""

from __future__ import annotations

from typing import Any

from llmlab.models import decoder_layers

# Per-layer submodules whose bodies are elementwise chains around (at most) matrix products.
FUSED_SUBMODULES = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "mlp",
)


def compile_elementwise(model: Any) -> int:
    """Compile every decoder layer's norms and MLP in place; return how many were compiled."""
    n = 0
    for layer in decoder_layers(model):
        for name in FUSED_SUBMODULES:
            mod = getattr(layer, name, None)
            if mod is not None:
                mod.compile(dynamic=True)
                n += 1
    return n


def restore_eager(model: Any) -> int:
    """Undo compile_elementwise; return how many modules were restored."""
    n = 0
    for layer in decoder_layers(model):
        for name in FUSED_SUBMODULES:
            mod = getattr(layer, name, None)
            if mod is not None and getattr(mod, "_compiled_call_impl", None) is not None:
                mod._compiled_call_impl = None
                n += 1
    return n
