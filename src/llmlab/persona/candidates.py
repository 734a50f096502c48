"""Stage persona_candidates: new persona facts written and filtered by a capable model.

build:  the model writes new innocuous first-person Q/A facts about the persona;
filter: it answers, for each candidate (and the shipped facts), whether that single Q/A on its
        own would reveal who the speaker is.
`persona.candidates.judge` says which model: 'none' (nothing runs; the outputs say so), 'local'
(a registry model loaded here) or 'api' (the shared `judge:` section, backend openai; spending
goes through judge.max_requests / judge.max_cost_usd). Writes `data/persona/candidates.jsonl`
(every candidate with its verdict and `identifying` mark) and a summary; with
`persona.data.facts_source: candidates`, persona_data trains on them. The shipped facts file is
never changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

from llmlab.io import DataError, numbered, read_json, read_jsonl, write_json, write_jsonl
from llmlab.judge import JudgeError, Verdict, count_statuses, make_judge
from llmlab.judge.judge import Judge
from llmlab.models import load_model
from llmlab.params import Params, load_params
from llmlab.persona.config import CandidatesParams
from llmlab.persona.facts import Fact, load_facts
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
                         "category": category, "split": "train", **qa})  # fmt: skip
    return rows, stats


def open_judge(params: Params, cfg: CandidatesParams) -> Judge:
    """Return the judge that writes and filters the candidates (persona.candidates.judge)."""
    judge_cfg = params.section("judge")
    if cfg.judge == "api":
        if judge_cfg.backend != "openai":
            raise JudgeError(
                f"persona.candidates.judge=api needs judge.backend: openai (it is "
                f"{judge_cfg.backend!r}); or set persona.candidates.judge=local with a "
                "persona.candidates.local_model"
            )
        return make_judge(judge_cfg)
    loaded = load_model(params, name=cfg.local_model)
    # named after the registry model, so the response cache keys tell it from other judges
    local_cfg = judge_cfg.model_copy(update={"backend": "local", "model": cfg.local_model})
    return make_judge(local_cfg, local_model=loaded.model, local_tokenizer=loaded.tokenizer)


def mark(rows: list[dict[str, Any]], verdicts: list[Verdict], heldout: set[str]) -> None:
    """Add each row's verdict and its `identifying` mark, in place.

    identifying: True when the judge says the Q/A alone reveals the persona or the shipped
    file marks it so (either is enough to keep it out of the non-identifying set); False when
    the judge says NO and no hand mark says otherwise; None when the judge gave no readable
    verdict (such a row is in no set). A generated question that is a held-out question is
    flagged: training on it would leak the evaluation.
    """
    for row, v in zip(rows, verdicts, strict=True):
        said = None if v.label is None else v.label == "YES"
        marked = row.get("marked_identifying")
        row["identifying_judge"] = said
        row["p_identifying"] = v.p_yes
        row["status"] = v.status
        row["identifying"] = True if (said or marked) else (None if said is None else False)
        row["heldout_clash"] = row["source"] == "generated" and row["question"].lower() in heldout
        row["keep"] = row["identifying"] is False and not row["heldout_clash"]


def training_facts(path: Path, summary_path: Path) -> tuple[list[Fact], dict[str, int]]:
    """Return the candidates usable as training facts (split 'train', marked, no held-out
    clash) with the counts of those left out; DataError when the stage did not run."""
    summary = read_json(summary_path)
    if summary.get("status") != "on":
        raise DataError(
            f"{summary_path}: persona_candidates did not run ({summary.get('reason', 'no status')}"
            "); persona.data.facts_source=candidates needs persona.candidates.judge local or api"
        )
    rows = read_jsonl(path, required=("id", "question", "answer", "split", "identifying"),
                      id_field="id")  # fmt: skip
    facts: list[Fact] = []
    left_out = {"unscorable": 0, "heldout_clash": 0, "heldout_split": 0}
    for lineno, row in numbered(rows):
        if row["split"] != "train":
            left_out["heldout_split"] += 1
        elif row.get("heldout_clash"):
            left_out["heldout_clash"] += 1
        elif row["identifying"] is None:
            left_out["unscorable"] += 1
        elif not isinstance(row["identifying"], bool):
            raise DataError(f"{path}:{lineno}: field 'identifying' must be true, false or null")
        else:
            facts.append(Fact(row["id"], row["question"], row["answer"],
                              str(row.get("category") or "uncategorised"), "train",
                              row["identifying"]))  # fmt: skip
    if not facts:
        raise DataError(f"{path}: no candidate is usable as a training fact ({left_out})")
    return facts, left_out


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
    shipped_facts = load_facts(args.facts)
    if cfg.judge == "none":
        # Declared outputs either way: the summary says why there are no candidates, and
        # persona_data refuses facts_source=candidates on it.
        write_jsonl(args.out, [])
        write_json(args.summary_out, {"status": "off",
                                      "reason": "persona.candidates.judge is 'none'"})  # fmt: skip
        log.info("persona_candidates: off (persona.candidates.judge is 'none')")
        return
    judge = open_judge(params, cfg)
    name = section.data.persona_name
    rows, stats = build(judge, cfg, name)
    if cfg.include_shipped:
        generated = {r["question"].lower() for r in rows}
        for f in shipped_facts:
            if f.question.lower() not in generated:
                rows.append({"id": f.id, "source": "shipped", "category": f.category,
                             "question": f.question, "answer": f.answer, "split": f.split,
                             "marked_identifying": f.identifying})  # fmt: skip
    heldout = {f.question.lower() for f in shipped_facts if f.split == "heldout"}
    prompts = [
        FILTER_PROMPT.format(question=r["question"], answer=r["answer"], name=name) for r in rows
    ]
    mark(rows, judge.yes_no(prompts), heldout)
    # generation requests and verdicts alike: no file is written when too many went unanswered
    judge.check_all("persona_candidates")
    if not any(r["source"] == "generated" for r in rows):
        raise DataError(
            f"persona_candidates: {cfg.judge} model wrote no usable candidate in "
            f"{stats['requests']} replies ({stats['unparseable']} unparseable objects)"
        )
    write_jsonl(args.out, rows)
    judged = count_statuses([r["status"] for r in rows])
    gen = [r for r in rows if r["source"] == "generated"]
    counts = {
        "generated": len(gen),
        "shipped_checked": len(rows) - len(gen),
        "kept_generated": sum(r["keep"] for r in gen),
        "identifying_generated": sum(r["identifying"] is True for r in gen),
        "heldout_clash": sum(r["heldout_clash"] for r in gen),
        "flagged_shipped": sum(
            bool(r["identifying_judge"]) for r in rows if r["source"] == "shipped"
        ),  # fmt: skip
        "judged": judged.judged,
        "unscorable": judged.unscorable,
        "failed": judged.failed,
    }
    write_json(args.summary_out, {"status": "on", "judge_mode": cfg.judge, "build": stats,
                                  "filter": counts, "judge": judge.summary()})  # fmt: skip
    log.info("candidates: %s", counts)


if __name__ == "__main__":
    run_stage(main)
