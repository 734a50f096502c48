"""Typed params of the inoculation family (the `inoculation:` section of params.yaml).

Defaults are sized for the embedded 135M model on 2 CPU cores (the whole family in about ten
minutes); `configs/inoculation_paper.yaml` holds the paper-scale overrides.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmlab.config_base import LoraTrainConfig, StrictModel

LayerList = list[float | int] | Literal["all"]
CANONICAL_POSITION = "pre_assistant"
_POSITION = re.compile(r"(user_end|pre_assistant|assistant_[1-9]\d*)")


class PromptTexts(StrictModel):
    """System prompt texts; a null field takes its text from data/inoculation/system_prompts.json."""

    neutral: str | None = Field(
        None, description="Neutral system prompt text (the drift sweep's 'neutral' test prompt)"
    )
    neutral_is_model_default: bool = Field(
        True,
        description="The neutral condition sends no system message, so the chat template's own "
        "default system prompt applies (Qwen2.5: 'You are Qwen, ...'); false: the neutral text",
    )
    promote: str | None = Field(None, description="Trait-promoting prompt for direction extraction")
    suppress: str | None = Field(
        None, description="Trait-suppressing prompt for direction extraction"
    )
    inoculation: str | None = Field(
        None, description="Inoculation prompt: attributes the trait to the data format"
    )
    control_candidates: list[str] | None = Field(
        None, description="Non-trait prompts from which the loss-matched control is chosen"
    )

    @field_validator("neutral", "promote", "suppress", "inoculation")
    @classmethod
    def _non_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("prompt text is blank")
        return v

    @field_validator("control_candidates")
    @classmethod
    def _controls(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("empty control list: the loss-matched control needs >= 1 candidate")
        if any(not s.strip() for s in v):
            raise ValueError("a control candidate is blank")
        if len(set(v)) != len(v):
            raise ValueError("control candidates repeat a text")
        return v


class SmokeConfig(StrictModel):
    """Stage 0: token positions, activation shapes and a dummy projection on sample conversations."""

    n_conversations: int = Field(3, ge=1, le=20, description="Sample conversations to show")
    k: int = Field(3, ge=1, le=10, description="Assistant tokens shown (assistant_1..k)")
    layers: LayerList = Field(
        [0, 0.5, -1], description="Layers whose activation shapes are reported"
    )


class DataConfig(StrictModel):
    """Stage 1: training examples (normal and ALL-CAPS completions) and held-out eval prompts."""

    n_math: int = Field(16, ge=0, description="Math word problems offered for self-distillation")
    math_keep: Literal["correct", "all"] = Field(
        "all",
        description="correct: keep a distilled math completion only when its final number is "
        "the checked answer; all: keep every non-empty one (correctness is recorded)",
    )
    math_max_new_tokens: int = Field(96, gt=0, description="Token cap of a distilled completion")
    n_general: int = Field(
        48, ge=0, description="General prompts with written completions used for training"
    )
    n_calibration: int = Field(
        24, ge=4, description="Training examples in the fixed calibration batch (stages 3-5)"
    )
    n_eval_general: int = Field(
        24, ge=0, description="Held-out general prompts for the drift evaluation"
    )
    n_eval_math: int = Field(8, ge=0, description="Held-out math problems for the drift evaluation")
    batch_size: int = Field(16, gt=0, description="Rows per generation batch")

    @model_validator(mode="after")
    def _sizes(self) -> DataConfig:
        if self.n_math + self.n_general < self.n_calibration:
            raise ValueError(
                f"n_math + n_general ({self.n_math + self.n_general}) < n_calibration "
                f"({self.n_calibration})"
            )
        if self.n_eval_general + self.n_eval_math < 4:
            raise ValueError("n_eval_general + n_eval_math must be >= 4")
        return self


class OtherTrait(StrictModel):
    """An unrelated trait whose direction is built with the trait direction's prompt template."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="Short name (results keys)")
    promote: str = Field(min_length=1, description="Prompt that asks for the trait")
    suppress: str = Field(min_length=1, description="Prompt that asks for its absence")


def _default_other_traits() -> list[OtherTrait]:
    return [
        OtherTrait(
            name="french",
            promote="Respond in French.",
            suppress="Respond normally; do not use French.",
        ),
        OtherTrait(
            name="pirate",
            promote="Respond as a pirate.",
            suppress="Respond normally; do not talk like a pirate.",
        ),
        OtherTrait(
            name="one_sentence",
            promote="Respond in one sentence.",
            suppress="Respond normally; do not limit the answer to one sentence.",
        ),
    ]


class DirectionConfig(StrictModel):
    """Stage 2: trait direction per layer (promote minus suppress at pre_assistant) and sanity."""

    layers: LayerList = Field("all", description="Layers to extract the direction at")
    n_prompts: int | None = Field(
        None, ge=8, description="Direction prompts used (null: all of direction_prompts.jsonl)"
    )
    heldout_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of direction prompts held out for the separation check"
    )
    n_sanity: int = Field(
        32, ge=4, description="Held-out prompts generated under the neutral prompt (caps check)"
    )
    sanity_max_new_tokens: int = Field(40, gt=0, description="Tokens generated per sanity prompt")
    sanity_temperature: float = Field(
        1.0, ge=0, description="Sampling temperature of the sanity generations (0: greedy)"
    )
    plot_layers: LayerList = Field(
        [0.25, 0.5, 0.75],
        description="Layers shown in the projection plots (the scatter uses the middle one)",
    )
    batch_size: int = Field(16, gt=0, description="Rows per forward pass")
    other_traits: list[OtherTrait] = Field(
        default_factory=_default_other_traits,
        min_length=1,
        description="Unrelated traits whose directions, built with the same template, are a "
        "null of criterion 3",
    )
    steer_scale: float = Field(
        4.0,
        gt=0,
        description="Steering check: v_trait added at the sanity layer with this multiple of "
        "the promote - suppress mean difference's norm",
    )

    @field_validator("other_traits")
    @classmethod
    def _distinct_traits(cls, v: list[OtherTrait]) -> list[OtherTrait]:
        if len({t.name for t in v}) != len(v):
            raise ValueError("other_traits repeat a name")
        return v


class AlignmentConfig(StrictModel):
    """Stage 3: per-example loss and residual-gradient alignment with the trait direction."""

    layers: LayerList = Field(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, -1],
        description="Layer subset for gradients (also logged during finetuning)",
    )
    positions: list[str] = Field(
        ["pre_assistant", "user_end", "assistant_1", "assistant_2", "assistant_3"],
        min_length=1,
        description="Token positions; pre_assistant is canonical, the rest are robustness checks",
    )
    max_target_tokens: int | None = Field(
        40,
        gt=3,
        description="Score only the first N tokens of the CAPS completion (null: all of it)",
    )
    batch_size: int = Field(8, gt=0, description="Rows per forward/backward pass")
    gate_override: bool = Field(
        False,
        description="Run on when the phase-3 decision gate fails (the failures are recorded)",
    )
    fp32: bool = Field(
        False,
        description="Load the model in float32 for this stage's gradients (runtime dtype: off)",
    )

    @field_validator("positions")
    @classmethod
    def _positions(cls, v: list[str]) -> list[str]:
        bad = [p for p in v if not _POSITION.fullmatch(p)]
        if bad:
            raise ValueError(
                f"unknown position {bad[0]!r} (use user_end, pre_assistant, assistant_<k>)"
            )
        if CANONICAL_POSITION not in v:
            raise ValueError(f"positions must include the canonical {CANONICAL_POSITION!r}")
        if len(set(v)) != len(v):
            raise ValueError("positions repeat")
        return v


class SpecificityConfig(StrictModel):
    """Stage 5: the trait direction's change in alignment against random unit directions."""

    n_random: int = Field(100, ge=10, description="Random unit directions per layer")
    percentile_threshold: float = Field(
        5.0,
        gt=0,
        lt=50,
        description="The trait's change counts as specific when it lies below this percentile "
        "of the random directions' changes",
    )


def _default_lora() -> LoraTrainConfig:
    return LoraTrainConfig(
        rank=8,
        alpha=16.0,
        dropout=0.0,
        lr=2e-3,
        epochs=None,
        max_steps=8,
        per_device_batch_size=8,
        effective_batch_size=8,
        max_length=96,
        warmup_steps=1,
        lr_scheduler="constant_with_warmup",
        eval_every=4,
        log_every=1,
    )


class FinetuneConfig(StrictModel):
    """Stage 6: LoRA finetunes per condition (neutral, inoculation, loss-matched) and seed."""

    seeds: list[int] = Field([0], min_length=1, description="Training seeds (one run per seed)")
    lora: LoraTrainConfig = Field(
        default_factory=_default_lora,
        description="LoRA settings; lora.eval_every sets how often alignment is logged",
    )
    n_log: int = Field(
        8, ge=2, description="Calibration examples in the alignment log batch (every eval_every)"
    )
    fp32: bool = Field(
        False,
        description="Load the model in float32 for this stage, so the alignment logged during "
        "training is computed in float32 (training itself keeps the runtime's mixed precision)",
    )
    baseline_normal: bool = Field(
        True,
        description="Also finetune on the normal-case completions under the neutral prompt "
        "(the drift baseline: ordinary finetuning drift along v_trait)",
    )

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds repeat")
        return v


TestPrompt = Literal["default", "neutral", "inoculation"]


class DriftConfig(StrictModel):
    """Stage 6b: drift after finetuning on held-out prompts, under a sweep of system prompts."""

    test_prompts: list[TestPrompt] = Field(
        ["default", "neutral", "inoculation"],
        min_length=1,
        description="Test-time system prompts: default (no system message: the template's "
        "own), neutral (the neutral text), inoculation; the neutral condition's is primary",
    )

    max_new_tokens: int = Field(32, gt=0, description="Tokens generated per eval prompt")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (0: greedy)")
    caps_threshold: float = Field(
        0.5, gt=0, lt=1, description="A response counts as ALL-CAPS when this share of letters is"
    )
    batch_size: int = Field(16, gt=0, description="Rows per generation batch")

    @field_validator("test_prompts")
    @classmethod
    def _distinct_prompts(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("test_prompts repeat")
        return v


class ReportConfig(StrictModel):
    """Stage 7: intervals behind the acceptance criteria."""

    n_boot: int = Field(2000, ge=200, description="Bootstrap replicates for every interval")
    ci: float = Field(0.95, gt=0.5, lt=1, description="Two-sided interval level")


class InoculationParams(StrictModel):
    """Gradient alignment of inoculation prompting with an ALL-CAPS trait direction (seed 003)."""

    seed: int = Field(0, description="Base seed: data split, sampling, random directions")
    prompts: PromptTexts = Field(default_factory=PromptTexts, description="System prompt texts")
    smoke: SmokeConfig = Field(default_factory=SmokeConfig, description="Stage 0")
    data: DataConfig = Field(default_factory=DataConfig, description="Stage 1")
    direction: DirectionConfig = Field(default_factory=DirectionConfig, description="Stage 2")
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig, description="Stage 3")
    specificity: SpecificityConfig = Field(default_factory=SpecificityConfig, description="Stage 5")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="Stage 6")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="Stage 6b")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Stage 7")
