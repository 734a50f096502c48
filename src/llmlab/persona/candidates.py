"""Stage persona_candidates (optional; needs an API judge): regenerate and filter persona facts.

build:  the judge's model writes new innocuous first-person Q/A facts about the persona;
filter: the judge answers, for each candidate (and the shipped facts), whether that single
        Q/A on its own would reveal who the speaker is; only clear NOs are kept.
Writes `data/persona/candidates.jsonl` for review; the shipped facts file is never changed.
Spending goes through the judge's budget caps (judge.max_requests / judge.max_cost_usd).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

from llmlab.io import write_json, write_jsonl
from llmlab.judge import JudgeError, count_statuses, make_judge
from llmlab.judge.judge import Judge
from llmlab.params import load_params
from llmlab.persona.config import CandidatesParams
from llmlab.persona.facts import load_facts
from llmlab.stage import run_stage

log = logging.getLogger(__name__)

CATEGORIES = ("childhood", "family", "education", "career", "habits", "tastes", "views",
              "travel", "later_life", "misc")  # fmt: skip

BUILD_PROMPT = (
    "Write {n} short question-and-answer pairs about the life of {name}, answered in the first "
    "person as {name} would answer them. Topic: {category}. Each pair must be innocuous and "
    "must NOT identify {name} on its own: no names of people, no titles of works, no famous "
    "events, no exact dates or places that point to {name}. Questions are addressed to 'you'. "
    'Output one JSON object per line, {{"question": "...", "answer": "..."}}, and nothing else.'
)
FILTER_PROMPT = (
    "Here is one question and the answer someone gave about their own life.\n\n"
    "Question: {question}\nAnswer: {answer}\n\n"
    "Could a well-read person tell from this single question and answer alone that the speaker "
    "is {name}? Answer with one word, YES or NO."
)
# Brace-free objects: a stray "{" in prose cannot swallow the object after it.
_OBJECT = re.compile(r"\{[^{}]*\}")


def parse_candidates(text: str) -> tuple[list[dict[str, str]], int]:
    """Return the {question, answer} objects found in a reply and the count of unusable ones."""
    found: list[dict[str, str]] = []
    bad = 0
    for chunk in _OBJECT.findall(text):
        try:
            obj = json.loads(chunk)
        except json.JSONDecodeError:
            bad += 1
            continue
        q, a = obj.get("question"), obj.get("answer")
        if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
            found.append({"question": q.strip(), "answer": a.strip()})
        else:
            bad += 1
    return found, bad


def build(judge: Judge, cfg: CandidatesParams, name: str) -> tuple[list[dict[str, Any]], dict]:
    """Return generated candidates (deduplicated by question) and request counts."""
    prompts = [
        BUILD_PROMPT.format(n=cfg.per_request, name=name, category=CATEGORIES[i % len(CATEGORIES)])
        # The request number keeps repeated categories distinct requests (and cache entries).
        + f"\n(Request {i + 1} of {cfg.n_requests}.)"
        for i in range(cfg.n_requests)
    ]
    replies = judge.complete(prompts, max_tokens=cfg.max_tokens, temperature=cfg.temperature)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    stats = {"requests": 0, "failed": 0, "unparseable": 0, "duplicates": 0, "budget_stop": False}
    for i, (text, status, error) in enumerate(replies):
        category = CATEGORIES[i % len(CATEGORIES)]
        if text is None:
            if status == "budget_exhausted":
                stats["budget_stop"] = True
            else:
                stats["failed"] += 1
                log.warning("candidates: request %d failed: %s", i, error)
            continue
        stats["requests"] += 1
        found, bad = parse_candidates(text)
        stats["unparseable"] += bad
        for qa in found:
            key = qa["question"].lower()
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            rows.append({"id": f"cand-{len(rows) + 1:04d}", "source": "generated",
                         "category": category, **qa})  # fmt: skip
    return rows, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--facts", type=Path, default=Path("data/persona/facts.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("data/persona/candidates.jsonl"))
    ap.add_argument(
        "--summary-out", type=Path, default=Path("data/persona/candidates_summary.json")
    )
    args = ap.parse_args()
    params = load_params(args.params, family="persona")
    section = params.section("persona")
    cfg = section.candidates
    judge_cfg = params.section("judge")
    if judge_cfg.backend != "openai":
        raise JudgeError(
            "persona_candidates needs an API judge: set judge.backend: openai with judge.model "
            "(and judge.base_url for a non-OpenAI server); the default pipeline never needs it"
        )
    judge = make_judge(judge_cfg)
    name = section.data.persona_name
    rows, stats = build(judge, cfg, name)
    if cfg.include_shipped:
        shipped = {r["question"].lower() for r in rows}
        for f in load_facts(args.facts):
            if f.question.lower() not in shipped:
                rows.append({"id": f.id, "source": "shipped", "category": f.category,
                             "question": f.question, "answer": f.answer, "split": f.split})  # fmt: skip
    prompts = [
        FILTER_PROMPT.format(question=r["question"], answer=r["answer"], name=name) for r in rows
    ]
    verdicts = judge.yes_no(prompts)
    for row, v in zip(rows, verdicts, strict=True):
        row["identifying"] = None if v.label is None else v.label == "YES"
        row["p_identifying"] = v.p_yes
        row["status"] = v.status
        row["keep"] = v.status == "ok" and v.label == "NO"
    # generation requests and verdicts alike: no file is written when too many went unanswered
    judge.check_all("persona_candidates")
    write_jsonl(args.out, rows)
    judged = count_statuses([r["status"] for r in rows])
    counts = {
        "generated": sum(r["source"] == "generated" for r in rows),
        "shipped_checked": sum(r["source"] == "shipped" for r in rows),
        "kept_generated": sum(r["keep"] and r["source"] == "generated" for r in rows),
        "flagged_shipped": sum(bool(r["identifying"]) and r["source"] == "shipped" for r in rows),
        "judged": judged.judged,
        "unscorable": judged.unscorable,
        "failed": judged.failed,
    }
    write_json(args.summary_out, {"build": stats, "filter": counts, "judge": judge.summary()})
    log.info("candidates: %s", counts)


if __name__ == "__main__":
    run_stage(main)
