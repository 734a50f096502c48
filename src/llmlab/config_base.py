"""Base types shared by every params section: the strict model, typed names, LoRA settings.

This module imports nothing of llmlab, so the loader (`llmlab.params`), the core library and
every family's `config` module can all build on it without an import circle.

Strictness lives in `StrictModel`'s config, so it covers every section at once: no unknown
keys, no coercion (`rank: true` is not 1, `lr: "1e-3"` is not a number, `seed: 1.5` is not
an integer), and no inf/nan where a number is expected (`lr: .inf`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from pydantic_core import PydanticCustomError

DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

# Error types whose input must never be shown: the value may be a secret pasted by mistake.
SECRET_ERROR_TYPES = frozenset({"env_var_name"})

_ENV_VAR_NAME = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")


class StrictModel(BaseModel):
    """Base for every params section: unknown keys, coercions and non-finite numbers are errors.

    `hide_input_in_errors` keeps values out of a ValidationError's own text, so a stray
    `str(error)` cannot print a key pasted into a params field; `llmlab.params` shows the
    offending value itself, except for the types in SECRET_ERROR_TYPES.
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        validate_assignment=True,
        validate_default=True,
        hide_input_in_errors=True,
    )

    # Where this section sits in params.yaml (e.g. "persona.train"), set by llmlab.params, so
    # a check made later (after a model loads) can still name the exact param.
    _param_path: str = PrivateAttr("")

    def path_of(self, field: str) -> str:
        """Return the params path of one of this section's fields (e.g. persona.train.lr)."""
        return f"{self._param_path}.{field}" if self._param_path else field


def _check_env_var_name(name: str) -> str:
    # The conventional shape of a variable name (OPENAI_API_KEY, HF_TOKEN). A long token of
    # capitals and digits with no underscore is refused too: that is what key ids look like
    # (AWS's AKIA... has 20), and this name is printed when the variable is unset.
    if not _ENV_VAR_NAME.fullmatch(name) or ("_" not in name and len(name) >= 16):
        raise PydanticCustomError(
            "env_var_name",
            "expected the name of an environment variable (capitals, digits and _, e.g. "
            "OPENAI_API_KEY), not its value; the value given is not shown",
        )
    return name


EnvVarName = Annotated[str, AfterValidator(_check_env_var_name)]
"""A param naming an environment variable (the variable holds a secret; the param never does)."""


class RegistryRef:
    """Marks a params field whose value is a name in the `models:` registry."""


RegistryModelName = Annotated[str, RegistryRef()]
"""A registry model name; `llmlab.params` checks it against `models:` and names the param."""


class LoraTrainConfig(StrictModel):
    """LoRA finetuning settings; families embed this model in their params sections."""

    rank: int = Field(16, gt=0, description="LoRA rank r")
    alpha: float = Field(
        32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / rank)"
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        description="Module names that get LoRA (default: all attention and MLP projections); "
        "each must match a module of the loaded model",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW)")
    epochs: float | None = Field(
        1.0, gt=0, description="Passes over the training data (fractions allowed); see max_steps"
    )
    max_steps: int | None = Field(
        None, gt=0, description="Optimizer steps; replaces epochs (giving both is an error)"
    )
    per_device_batch_size: int = Field(8, gt=0, description="Examples per forward pass per device")
    effective_batch_size: int = Field(
        8,
        gt=0,
        description="Examples per optimizer step over all devices; gradient accumulation = "
        "effective / (per_device x world size), which must divide exactly",
    )
    max_length: int = Field(
        1024, gt=1, description="Tokens kept per example (longer ones are truncated and counted)"
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear warmup steps (exclusive with warmup_ratio)"
    )
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Warmup as a fraction of all steps (exclusive with warmup_steps)",
    )
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm")
    seed: int = Field(0, description="Seed for LoRA init, data order and dropout")
    eval_every: int | None = Field(
        None,
        gt=0,
        description="Steps between evaluations (val loss and eval hook); evaluation also runs "
        "before the first and after the last step",
    )
    log_every: int = Field(10, gt=0, description="Steps per curve row (losses averaged over them)")
    packing: bool = Field(
        True,
        description="Pack each micro-batch's examples (in random order) into rows of at most "
        "max_length tokens, attention kept within each example (per-example position ids), "
        "the loss computed on labelled positions only in chunks; no padding compute. Off: one "
        "padded row per example",
    )
    group_by_length: bool = Field(
        True,
        description="Without packing: batch examples of similar length together (less padding; "
        "changes the per-step mix of data groups, see batch_mix in the adapter metadata)",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, slower)"
    )
    divergence_factor: float | None = Field(
        5.0,
        gt=1,
        description="Stop when the smoothed loss exceeds this factor times the initial loss, "
        "after warmup (null: no divergence check)",
    )
    nan_patience: int = Field(
        0, ge=0, description="Consecutive steps with a NaN/inf loss tolerated before stopping"
    )
    save_every: int | None = Field(
        50,
        gt=0,
        description="Optimizer steps between resumable checkpoints in <output>.partial (the "
        "newest complete one is kept; a re-run with the same config and data resumes from it); "
        "null: no checkpoints",
    )

    @model_validator(mode="after")
    def _check_exclusive(self) -> LoraTrainConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set epochs or max_steps")
        if (
            {"epochs", "max_steps"} <= self.model_fields_set
            and self.epochs is not None
            and self.max_steps is not None
        ):
            raise ValueError("set epochs or max_steps, not both")
        if self.warmup_steps is not None and self.warmup_ratio > 0:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if self.effective_batch_size % self.per_device_batch_size:
            raise ValueError(
                f"effective_batch_size {self.effective_batch_size} is not a multiple of "
                f"per_device_batch_size {self.per_device_batch_size}"
            )
        return self
