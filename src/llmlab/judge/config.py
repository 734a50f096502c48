"""Configuration of the LLM judge (validated; unknown keys are errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmlab.config_base import EnvVarName, StrictModel


class JudgeConfig(StrictModel):
    """Settings for one judge: which backend, how hard to retry, and how much it may spend."""

    backend: Literal["openai", "local"] = Field(
        "local",
        description="'openai': an OpenAI-compatible HTTP server; 'local': a transformers LM.",
    )
    base_url: str | None = Field(
        None,
        description="Server root such as http://127.0.0.1:8000/v1; None uses the OpenAI default.",
    )
    model: str = Field(
        "",
        description="Judge model name sent to the server (required for 'openai'); for 'local' it "
        "names the model in cache keys (empty: the model's own name_or_path).",
    )
    api_key_env: EnvVarName = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the API key; the key itself is never "
        "stored in params, logs, metrics or the cache.",
    )
    max_concurrency: int = Field(
        8, ge=1, description="Requests in flight at once (thread pool size)."
    )
    local_batch_size: int = Field(
        16,
        ge=1,
        description="backend 'local': requests answered together in one padded batch "
        "(1: one at a time).",
    )
    max_retries: int = Field(
        6, ge=0, description="Retries per item on 429/5xx/timeouts/connection errors/bad replies."
    )
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one HTTP request, in seconds.")
    backoff_base_s: float = Field(
        1.0, ge=0, description="First retry delay in seconds; doubles per retry, with jitter."
    )
    backoff_max_s: float = Field(
        30.0, ge=0, description="Upper bound of one retry delay, in seconds."
    )
    max_requests: int | None = Field(
        None, ge=0, description="Budget cap on paid (non-cached) requests; None means no cap."
    )
    max_cost_usd: float | None = Field(
        None, ge=0, description="Budget cap on estimated spend in USD; None means no cap."
    )
    usd_per_1k_input_tokens: float | None = Field(
        None, ge=0, description="Price of 1000 prompt tokens in USD (for the cost cap and summary)."
    )
    usd_per_1k_output_tokens: float | None = Field(
        None,
        ge=0,
        description="Price of 1000 completion tokens in USD (for the cost cap and summary).",
    )
    cache_dir: str | None = Field(
        "judge",
        description="Directory of the on-disk response cache; a relative path lies under the "
        "per-user cache ($LLMLAB_CACHE, default ~/.cache/llmlab), so queued experiments and "
        "re-runs share it; None disables it.",
    )
    max_failed_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Largest share of a judged stage's items that may go unanswered (transport "
        "error, budget stop, malformed body after retries); above it the stage exits non-zero "
        "and writes nothing.",
    )
    min_judged_share: float = Field(
        0.9,
        ge=0,
        le=1,
        description="A rate computed from fewer than this share of its planned items is flagged "
        "in reports and metrics.",
    )
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of judge requests.")
    max_tokens: int = Field(16, ge=1, description="Completion length limit for yes/no questions.")

    @model_validator(mode="after")
    def _check_consistency(self) -> JudgeConfig:
        """Return self after checking fields that depend on each other."""
        if self.backend == "openai" and not self.model:
            raise ValueError("judge.model is required when judge.backend is 'openai'")
        if self.max_cost_usd is not None and (
            self.usd_per_1k_input_tokens is None or self.usd_per_1k_output_tokens is None
        ):
            raise ValueError(
                "judge.max_cost_usd needs usd_per_1k_input_tokens and usd_per_1k_output_tokens"
            )
        return self
