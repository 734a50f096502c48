"""Stage persona_judge: judge verdicts and deterministic checks for every generated sample.

Judge (YES/NO, read from first-token logprobs when the backend gives them): does the reply
adopt the persona; does it call itself an AI. Rules beside it: format compliance, persona
keyword and name mentions, AI self-reference phrases, refusals, empty answers. A verdict that
cannot be read is kept as null with its status, and counted: never turned into a NO.

Items the judge never answered (transport error, budget stop, malformed body after retries)
are counted apart from unscorable ones; above `judge.max_failed_share` of them the stage
exits non-zero before writing, so the previous outputs stay as they were.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from llmlab.io import read_jsonl, write_json, write_jsonl
from llmlab.judge import JudgeConfig, Verdict, count_statuses, make_judge
from llmlab.judge.judge import Judge
from llmlab.models import load_model
from llmlab.params import Params, load_params
from llmlab.persona.checks import (
    is_empty,
    mentions,
    name_keywords,
    persona_keyword,
    refuses,
    says_ai,
)
from llmlab.persona.judge_prompts import Prompt, as_ai_prompt, persona_prompt
from llmlab.persona.trigger import Trigger
from llmlab.stage import run_stage

log = logging.getLogger(__name__)
GENERATION_FIELDS = ("id", "model", "condition", "triggered", "question_id", "question",
                     "question_set", "keywords", "reference", "response")  # fmt: skip


def build_judge(params: Params) -> tuple[Judge, float | None]:
    """Return the shared judge (with this family's reply-length override) and, for a local
    judge, its size in millions of parameters."""
    section = params.section("persona").judge
    cfg: JudgeConfig = params.section("judge")
    if section.max_tokens is not None:
        cfg = cfg.model_copy(update={"max_tokens": section.max_tokens})
    if cfg.backend != "local":
        return make_judge(cfg), None
    loaded = load_model(params, name=section.local_model or params.model)
    size = sum(p.numel() for p in loaded.model.parameters()) / 1e6
    return make_judge(cfg, local_model=loaded.model, local_tokenizer=loaded.tokenizer), size


def verdict_fields(prefix: str, v: Verdict) -> dict[str, Any]:
    """Return a verdict as row fields: 1/0 label (null unless ok), P(yes) and status."""
    label = None if v.label is None else int(v.label == "YES")
    return {prefix: label, f"{prefix}_p_yes": v.p_yes, f"{prefix}_status": v.status}


def rule_fields(row: dict[str, Any], trigger: Trigger, names: tuple[str, ...]) -> dict[str, Any]:
    """Return the deterministic checks of one reply."""
    text = row["response"]
    return {
        "format_ok": int(trigger.complies(text)),
        "keyword_persona": int(persona_keyword(text, row["keywords"], names)),
        "name_mention": int(mentions(text, names)),
        "as_ai_rule": int(says_ai(text)),
        "refusal": int(refuses(text)),
        "empty": int(is_empty(trigger.body(text))),
    }


def judge_prompts(
    rows: list[dict[str, Any]], trigger: Trigger, name: str
) -> tuple[list[Prompt], list[Prompt]]:
    """Return the persona and as-AI judge prompts of generated rows.

    The judge sees the answer without the trigger's markers: a judge that reads <START> knows
    the condition. The rules (rule_fields) still see the whole reply, for format compliance.
    """
    bodies = [trigger.body(r["response"]) for r in rows]
    pairs = list(zip(rows, bodies, strict=True))
    persona = [persona_prompt(r["question"], b, name, r["reference"]) for r, b in pairs]
    return persona, [as_ai_prompt(r["question"], b) for r, b in pairs]


def ask(
    judge: Judge, rows: list[dict[str, Any]], trigger: Trigger, name: str, as_ai_check: bool
) -> tuple[list[Verdict], list[Verdict | None]]:
    """Return the persona verdicts and (when asked for) the as-AI verdicts of generated rows."""
    persona_prompts, as_ai_prompts = judge_prompts(rows, trigger, name)
    persona = judge.yes_no(persona_prompts)
    as_ai: list[Verdict | None] = [None] * len(rows)
    if as_ai_check:
        as_ai = list(judge.yes_no(as_ai_prompts))
    return persona, as_ai


def judged_rows(
    rows: list[dict[str, Any]],
    persona: list[Verdict],
    as_ai: list[Verdict | None],
    trigger: Trigger,
    names: tuple[str, ...],
) -> list[dict[str, Any]]:
    """Return the generated rows with their verdicts and the deterministic checks."""
    out = []
    for row, vp, va in zip(rows, persona, as_ai, strict=True):
        judged = {**row, **verdict_fields("judge_persona", vp), **rule_fields(row, trigger, names)}
        if va is not None:
            judged.update(verdict_fields("judge_as_ai", va))
        out.append(judged)
    return out


AGREEMENT_FIELDS = ("id", "question", "reference", "response", "persona", "as_ai")


def agreement(labels: list[int], verdicts: list[Verdict]) -> dict[str, Any]:
    """Return the judge's agreement with hand labels over its scorable verdicts: accuracy and
    Cohen's kappa (sklearn), with the counts they rest on."""
    from sklearn.metrics import cohen_kappa_score

    pairs = [(y, int(v.label == "YES")) for y, v in zip(labels, verdicts, strict=True)
             if v.label is not None]  # fmt: skip
    out: dict[str, Any] = {"n_labelled": len(labels), "n_scorable": len(pairs),
                           "accuracy": None, "kappa": None}  # fmt: skip
    if pairs:
        truth, said = zip(*pairs, strict=True)
        out["accuracy"] = round(sum(a == b for a, b in pairs) / len(pairs), 4)
        # kappa is undefined when both sides use one label only
        if len(set(truth) | set(said)) > 1:
            out["kappa"] = round(float(cohen_kappa_score(truth, said)), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--generations", type=Path, default=Path("data/persona/generations.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("data/persona/judged.jsonl"))
    ap.add_argument("--summary-out", type=Path, default=Path("data/persona/judge_summary.json"))
    ap.add_argument(
        "--agreement",
        type=Path,
        default=None,
        help="hand-labelled replies the judge is also scored against (the persona_judge stage "
        "passes data/persona/judge_agreement.jsonl; without it the report says it is missing)",
    )
    args = ap.parse_args()
    params = load_params(args.params, family="persona")
    section = params.section("persona")
    trigger = Trigger.from_params(section.trigger)
    name = section.data.persona_name
    names = name_keywords(name)
    rows = read_jsonl(args.generations, required=GENERATION_FIELDS, id_field="id")
    labelled = (
        read_jsonl(args.agreement, required=AGREEMENT_FIELDS, id_field="id")
        if args.agreement
        else []
    )

    judge, size = build_judge(params)
    persona, as_ai = ask(judge, rows, trigger, name, section.judge.as_ai_check)
    # the hand-labelled set, asked exactly as the grid is
    agree_persona: list[Verdict] = []
    agree_as_ai: list[Verdict] = []
    if labelled:
        label_persona, label_as_ai = judge_prompts(labelled, trigger, name)
        agree_persona = list(judge.yes_no(label_persona))
        if section.judge.as_ai_check:
            agree_as_ai = list(judge.yes_no(label_as_ai))
    asked = {"judge_persona": persona}
    if section.judge.as_ai_check:
        asked["judge_as_ai"] = [v for v in as_ai if v is not None]
    if labelled:
        asked["agreement_set"] = [*agree_persona, *agree_as_ai]
    # one share over every verdict of the stage; the counts are kept per question
    judge.check([v.status for verdicts in asked.values() for v in verdicts], "persona_judge")
    counts = {k: count_statuses([v.status for v in verdicts]) for k, verdicts in asked.items()}
    write_jsonl(args.out, judged_rows(rows, persona, as_ai, trigger, names))
    statuses = {
        "judge_persona": dict(Counter(v.status for v in persona)),
        "judge_as_ai": dict(Counter(v.status for v in as_ai if v is not None)),
    }
    agreement_out: dict[str, Any] = {}
    if args.agreement:
        agreement_out = {"file": str(args.agreement),
                         "persona": agreement([r["persona"] for r in labelled], agree_persona)}  # fmt: skip
        if section.judge.as_ai_check:
            agreement_out["as_ai"] = agreement([r["as_ai"] for r in labelled], agree_as_ai)
    summary = {
        "agreement": agreement_out,
        "judge": judge.summary(),
        "judge_params_millions": size,
        "statuses": statuses,
        "counts": {k: c.to_dict() for k, c in counts.items()},
    }
    write_json(args.summary_out, {**summary, "n_rows": len(rows)})
    log.info(
        "judged %d replies: %s",
        len(rows),
        "; ".join(f"{k}: {c.describe()}" for k, c in counts.items()),
    )


if __name__ == "__main__":
    run_stage(main)
