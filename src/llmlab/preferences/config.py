"""Typed params of the preferences family (the `preferences:` section of params.yaml).

Defaults are sized so the whole family runs in about ten minutes on 2 CPU cores with the
embedded model; `configs/preferences_paper.yaml` holds the GPU / paper-scale values
(Gemma-3-27B, 10k train / 3k eval tasks).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from llmlab.config_base import RegistryModelName, StrictModel
from llmlab.preferences.prompts import COMPLETION_TEMPLATE, DEFAULT_TEMPLATE, check_template

DEFAULT_LAYERS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
HUB_SOURCES = ("gsm8k", "alpaca", "wildchat")
NAMED_TEMPLATES = {"choice": DEFAULT_TEMPLATE, "completion": COMPLETION_TEMPLATE}


# WildChat-1M at a fixed commit of its hub repository (a branch moves under a run).
WILDCHAT_DATASET = "allenai/WildChat-1M"
WILDCHAT_REVISION = "78acdff91e618128920151298128e3f85d6e423d"
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")

# Named sources of the seed's origins that are public (BailBench and the stress tests are not).
# A preset given a `path` reads that local file, in the dataset's schema, instead of the hub.
SOURCE_PRESETS: dict[str, dict[str, Any]] = {
    "wildchat": {
        "dataset": WILDCHAT_DATASET,
        "revision": WILDCHAT_REVISION,
        "text_field": "conversation",
        "conversation": True,
        "id_field": "conversation_hash",
        "filters": {"language": "English"},
    },
    "alpaca": {
        "dataset": "tatsu-lab/alpaca",
        "text_field": "instruction",
        "filters": {"input": ""},
    },
    "math": {"dataset": "EleutherAI/hendrycks_math", "config": "algebra", "text_field": "problem"},
    "gsm8k": {"dataset": "openai/gsm8k", "config": "main", "text_field": "question"},
}
HUB_ONLY_FIELDS = ("dataset", "config", "revision")


class TaskSource(StrictModel):
    """One task source mixed into the pool: a Hugging Face dataset or a local JSONL / CSV."""

    origin: str = Field(min_length=1, description="Origin name of its tasks (and id prefix)")
    count: int = Field(gt=0, description="Tasks to add from this source")
    preset: str | None = Field(
        None, description=f"Named source filling the fields below ({', '.join(SOURCE_PRESETS)})"
    )
    dataset: str | None = Field(None, description="Hugging Face dataset name")
    config: str | None = Field(None, description="Dataset configuration")
    revision: str | None = Field(
        None, description="Commit of the dataset's hub repository (40 hex digits; None: latest)"
    )
    split: str = Field("train", description="Dataset split")
    path: str | None = Field(
        None,
        description="Local .jsonl or .csv file instead of a dataset (with a preset: a "
        "local copy in the dataset's schema)",
    )
    text_field: str = Field("prompt", description="Field holding the task text")
    conversation: bool = Field(
        False,
        description="text_field holds a chat (a list of {role, content} turns, as WildChat's "
        "`conversation`); the task is its first user turn",
    )
    id_field: str | None = Field(None, description="Field holding a stable id (None: row number)")
    filters: dict[str, str] = Field(
        default_factory=dict, description="Keep rows whose field equals the value"
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            if data["preset"] not in SOURCE_PRESETS:
                raise ValueError(
                    f"unknown source preset {data['preset']!r} (known: {', '.join(SOURCE_PRESETS)})"
                )
            fill = SOURCE_PRESETS[data["preset"]]
            if data.get("path") is not None:  # the local copy replaces the hub repository
                fill = {k: v for k, v in fill.items() if k not in HUB_ONLY_FIELDS}
            data = {**fill, **data}
        return data

    @model_validator(mode="after")
    def _one_place(self) -> TaskSource:
        if (self.dataset is None) == (self.path is None):
            raise ValueError(f"source {self.origin!r}: give exactly one of dataset and path")
        if self.revision is not None:
            if self.path is not None:
                raise ValueError(f"source {self.origin!r}: revision applies to a hub dataset only")
            if not _COMMIT_SHA.fullmatch(self.revision):
                raise ValueError(
                    f"source {self.origin!r}: revision must be a commit of the dataset repo "
                    f"(40 hex digits), got {self.revision!r}"
                )
        return self


class TasksSection(StrictModel):
    """Stage 1: the task pool and the disjoint train / eval draw."""

    pool: str = Field("data/preferences/tasks.jsonl", description="Shipped task pool (JSONL)")
    topics: str = Field("data/preferences/topics.json", description="Topic file of the pool")
    exclude_ids_file: str | None = Field(
        None, description="Optional file of task ids (one per line) never to be measured"
    )
    hub: dict[str, int] = Field(
        default_factory=dict,
        description="Public sources added to the pool when the hub is reachable: "
        "{gsm8k|alpaca|wildchat: n}; topics come from topic_classifier. Empty: the shipped "
        "pool only (offline default)",
    )
    hub_required: bool = Field(
        False, description="Fail when a hub source is unreachable (False: warn and go on)"
    )
    sources: list[TaskSource] = Field(
        default_factory=list,
        description="Further task sources (Hugging Face datasets or local JSONL / CSV), each "
        "with an origin name and a count; topics from topic_classifier",
    )
    topic_classifier: Literal["judge", "minilm"] = Field(
        "minilm",
        description="Topics of hub tasks: 'judge' asks the LLM of params `judge:` (the seed's "
        "classification; MiniLM fills in unparseable replies), 'minilm' the offline "
        "nearest-centroid fallback",
    )
    topic_check: str = Field(
        "data/preferences/topic_check.jsonl",
        description="Hand-labelled tasks the topic classifier is scored on (accuracy, kappa)",
    )

    @field_validator("hub")
    @classmethod
    def _known_sources(cls, v: dict[str, int]) -> dict[str, int]:
        for name, n in v.items():
            if name not in HUB_SOURCES:
                raise ValueError(f"unknown hub source {name!r} (known: {', '.join(HUB_SOURCES)})")
            if n < 0:
                raise ValueError(f"hub.{name}: expected a non-negative count")
        return v


class RunSection(StrictModel):
    """One measurement run (the plan's train or eval config)."""

    n_tasks: int = Field(gt=2, description="Tasks in this run (plan: 10000 train, 3000 eval)")
    n_samples: int = Field(
        gt=0, description="Samples per pair-order on the sampling backend (logprobs: unused)"
    )
    batch_size: int = Field(gt=0, description="New pairs measured per active-learning round")
    convergence_threshold: float = Field(
        gt=0, le=1, description="Stop when successive fits' rank correlation exceeds this"
    )
    edge_budget: float = Field(
        gt=0,
        description="Edge target as a multiple of N*log2(N) (protocol: 2.0; smaller on CPU)",
    )
    holdout_pairs: int = Field(
        0,
        ge=0,
        description="Pairs drawn uniformly at random (apart from the active-learning edges) "
        "and measured only for the held-out fit metrics; 0: none",
    )


class ElicitationSection(StrictModel):
    """How a pair is asked and how the choice probability is read."""

    template: str = Field(
        DEFAULT_TEMPLATE,
        description="User prompt with {task_a} and {task_b}, or a named one: 'choice' (respond "
        "with only A or B) or 'completion' (the seed's: begin with 'Task A:' or 'Task B:' and "
        "complete the task; for the sampling backend)",
    )
    backend: Literal["logprobs", "sampling"] = Field(
        "logprobs", description="logprobs: P from A/B token probabilities; sampling: K samples"
    )
    temperature: float = Field(1.0, gt=0, description="Sampling backend temperature")
    max_new_tokens: int = Field(6, gt=0, description="Sampling backend answer length")
    min_mass: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="Logprob backend: a pair-order whose p(A) + p(B) is below this counts "
        "0.5/0.5 (a refusal is not a choice); counted in the fit report",
    )
    batch_size: int = Field(48, gt=0, description="Pair-orders per forward pass")
    prefix_cache: bool = Field(
        True,
        description="Compute the prompt up to task A once per distinct task A and score the "
        "suffixes in batches of similar length against its key/value cache (used only when it "
        "processes fewer tokens than one plain forward per pair-order)",
    )
    prefix_cache_tokens: int = Field(
        32768,
        gt=0,
        description="Key/value tokens the prefix cache holds: a chunk of prefixes, and one "
        "suffix batch's gathered context",
    )

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        v = NAMED_TEMPLATES.get(v, v)
        check_template(v)
        return v


class FitSection(StrictModel):
    """Thurstonian fit."""

    method: Literal["lbfgs", "adam"] = Field("lbfgs", description="scipy L-BFGS-B or torch Adam")
    max_iter: int = Field(1000, gt=0, description="Optimiser iterations (Adam: steps)")
    log_sigma_bounds: list[float] = Field(
        [-3.0, 2.0],
        min_length=2,
        max_length=2,
        description="Bounds [low, high] on log sigma during the fit",
    )
    prior: float = Field(0.01, ge=0, description="Weight of the N(0, 1) prior on mu per item")
    holdout_frac: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Share of the active-learning edges held out for the protocol's held-out-edge "
        "metrics (near-ties by construction; the random hold-out pairs are the unbiased check)",
    )
    reliability_splits: int = Field(5, gt=0, description="Split-half fits for the noise ceiling")


class ActivationsSection(StrictModel):
    """Residual-stream capture."""

    layers: list[float | int] = Field(
        default_factory=lambda: list(DEFAULT_LAYERS),
        description="Layers to capture: fractions of depth (plan: 0.1 ... 0.9)",
    )
    position: str = Field("prompt_last", description="Token position (see llmlab.chat)")
    store_dtype: Literal["float16", "float32"] = Field(
        "float16",
        description="Stored activation dtype (float16: half the size to push; CPU stages read "
        "float32 and refuse an overflowed value)",
    )
    batch_size: int = Field(32, gt=0, description="Prompts per forward pass")


class ProbesSection(StrictModel):
    """Standardised Ridge probes on train utilities, scored on eval."""

    alpha_min: float = Field(1e-1, gt=0, description="Smallest Ridge alpha of the sweep")
    alpha_max: float = Field(1e6, gt=0, description="Largest Ridge alpha of the sweep")
    alpha_sweep_size: int = Field(10, gt=0, description="Log-spaced alphas in the sweep")
    eval_split_seed: int = Field(42, description="Seed of the eval halves (sweep / score)")
    n_boot: int = Field(1000, gt=0, description="Bootstrap replicates for intervals")

    @model_validator(mode="after")
    def _range(self) -> ProbesSection:
        if self.alpha_min > self.alpha_max:
            raise ValueError("alpha_min must not exceed alpha_max")
        return self


class HooSection(StrictModel):
    """Held-one-topic-out generalisation and content baselines."""

    base_model: RegistryModelName | None = Field(
        None, description="Registry name of the base model (None: the model's base_model field)"
    )
    content_baseline: bool = Field(True, description="Include all-MiniLM-L6-v2 embeddings")
    topics: list[str] | None = Field(None, description="Folds (None: every topic of the file)")
    min_fold_size: int = Field(4, ge=2, description="Fewest tasks a held-out topic may have")
    batch_size: int = Field(32, gt=0, description="Prompts per forward pass (base model)")


class OodSection(StrictModel):
    """System-prompt manipulations (plan step 5)."""

    prompts: str = Field("data/preferences/ood_prompts.jsonl", description="Manipulations file")
    kinds: list[Literal["category", "novel_topic", "competing", "persona"]] = Field(
        default_factory=lambda: ["category", "novel_topic", "competing", "persona"],
        description="Manipulation kinds to run",
    )
    n_targets: int = Field(2, gt=0, description="Target tasks per manipulated topic or subject")
    n_comparisons: int = Field(
        2, gt=0, description="Utility-matched comparison tasks per target group (plan: ~50)"
    )
    n_samples: int = Field(10, gt=0, description="Samples per pair-order on the sampling backend")
    n_boot: int = Field(1000, gt=0, description="Bootstrap replicates for intervals")
    select_share: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Share of each kind's system prompts (a competing pair counts once) used to "
        "choose the OOD probe layer; the rest are held out and give the reported OOD numbers",
    )
    layer: Literal["select", "probes"] = Field(
        "select",
        description="OOD probe layer: 'select' = best targeted r on the selection prompts, "
        "'probes' = the probes stage's layer (chosen on preference data only)",
    )


class PreferencesParams(StrictModel):
    """Utilities from pairwise choices, activation probes, HOO and OOD generalisation."""

    seed: int = Field(0, description="Seed of the split, pair sampling and folds")
    tasks: TasksSection = Field(default_factory=TasksSection, description="Task pool and split")
    train: RunSection = Field(
        default_factory=lambda: RunSection(
            n_tasks=150,
            n_samples=5,
            batch_size=150,
            convergence_threshold=0.995,
            edge_budget=0.4,
            holdout_pairs=40,
        ),
        description="Train measurement run (plan: 10k tasks)",
    )
    eval: RunSection = Field(
        default_factory=lambda: RunSection(
            n_tasks=90,
            n_samples=3,
            batch_size=90,
            convergence_threshold=0.99,
            edge_budget=0.4,
            holdout_pairs=30,
        ),
        description="Eval measurement run (plan: 3k tasks), disjoint from train",
    )
    elicitation: ElicitationSection = Field(
        default_factory=ElicitationSection, description="Forced-choice prompt and backend"
    )
    fit: FitSection = Field(default_factory=FitSection, description="Thurstonian fit")
    activations: ActivationsSection = Field(
        default_factory=ActivationsSection, description="Activation capture"
    )
    probes: ProbesSection = Field(default_factory=ProbesSection, description="Ridge probes")
    hoo: HooSection = Field(default_factory=HooSection, description="Held-one-topic-out")
    ood: OodSection = Field(default_factory=OodSection, description="OOD system prompts")
