"""Typed params of the foundation smoke chain (the `foundation:` section of params.yaml)."""

from __future__ import annotations

from pydantic import Field

from llmlab.config_base import StrictModel


class FoundationParams(StrictModel):
    """A small chain proving the wiring: load the model, capture activations, write a metric."""

    n_prompts: int = Field(
        200, gt=1, description="Prompts from the shared pool to read activations on"
    )
    layers: list[float | int] = Field(
        [0.25, 0.5, 0.75], description="Layers to capture: ints, negatives or fractions of depth"
    )
    position: str = Field("prompt_last", description="Token position to read (see llmlab.chat)")
    batch_size: int = Field(16, gt=0, description="Rows per forward pass")
    seed: int = Field(0, description="Seed for the prompt sample")
