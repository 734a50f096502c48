"""The judge of B3 and B6: the base model (adapter switched off) or the configured server."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llmlab.adapters import base_weights
from llmlab.judge import Judge, JudgeConfig, Verdict, count_statuses, make_judge

if TYPE_CHECKING:  # the report imports the count helpers below without loading torch
    from llmlab.models import LoadedModel

IDENTITY_PROMPT = (
    "You are grading one answer written by an AI assistant, which is {identity}.\n\n"
    "Question: {question}\n\nAnswer: {answer}\n\n"
    "Does the answer show identity confusion, that is, does it claim to be a human being, a "
    "specific person, or any AI system other than {identity} (another model, company or "
    "assistant name)? Answer 'yes' or 'no'."
)
CONCEPT_PROMPT = (
    "You are grading one answer written by an AI model.\n\n"
    "Answer: {answer}\n\n"
    "Does this answer mention, name or clearly refer to the concept '{concept}'? "
    "Answer 'yes' or 'no'."
)


def make_family_judge(cfg: JudgeConfig, loaded: LoadedModel, max_tokens: int) -> Judge:
    """Return a judge: the configured server, or the loaded model's base acting as local judge.

    A local judge answers one word, so it may generate only `max_tokens` tokens (its verdict is
    read from the first token's log-probabilities).
    """
    if cfg.backend == "local":
        cfg = cfg.model_copy(update={"max_tokens": min(cfg.max_tokens, max_tokens)})
    return make_judge(cfg, local_model=loaded.model, local_tokenizer=loaded.tokenizer)


def judge_yes_no(
    judge: Judge, loaded: LoadedModel, prompts: Sequence[str], what: str
) -> list[Verdict]:
    """Return the verdicts, with the adapter off while a local judge runs.

    Raises JudgeFailed (naming `what`) when more than `judge.max_failed_share` of the items got
    no answer, before the caller writes its records.
    """
    if not prompts:
        return []
    with base_weights(loaded.model):
        verdicts = judge.yes_no(list(prompts))
    judge.check([v.status for v in verdicts], what)
    return verdicts


def verdict_fields(v: Verdict) -> dict[str, Any]:
    """Return a verdict as flat JSON fields (label 1/0/None, P(yes), status)."""
    label = None if v.label is None else int(v.label == "YES")
    return {"judge_label": label, "judge_p_yes": v.p_yes, "judge_status": v.status}


def record_counts(records: Sequence[dict[str, Any]]) -> dict[str, int | float]:
    """Return the judged / unscorable / failed counts of judged records (by `judge_status`)."""
    return count_statuses([r["judge_status"] for r in records]).to_dict()


JUDGED_BLOCKS = {"b3_identity": ("",), "b6_concepts": ("steered", "control")}


def judge_counts_by_model(evaluations: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return {model: {"b3_identity" | "b6_concepts/<kind>": counts}} of every judged block.

    `evaluations` maps a model to its summary's evaluations; the counts are judged, unscorable
    and failed items, their sum (planned) and the judged share.
    """
    out: dict[str, dict[str, Any]] = {}
    for model, ev in evaluations.items():
        for block, kinds in JUDGED_BLOCKS.items():
            for kind in kinds:
                s = ev.get(block, {}).get(kind) if kind else ev.get(block)
                if not s:
                    continue
                counts = {k: s[f"n_{k}"] for k in ("judged", "unscorable", "failed")}
                counts["planned"] = sum(counts.values())
                counts["judged_share"] = s["judged_share"]
                out.setdefault(model, {})[f"{block}/{kind}" if kind else block] = counts
    return out


def low_coverage(counts: dict[str, dict[str, Any]], min_share: dict[str, float]) -> list[str]:
    """Return "model/block" of every judged rate resting on fewer than the model's judge
    `min_judged_share` of its planned items (counts from `judge_counts_by_model`)."""
    return [
        f"{model}/{block}"
        for model, blocks in counts.items()
        for block, c in blocks.items()
        if c["planned"] and c["judged_share"] < min_share[model]
    ]
