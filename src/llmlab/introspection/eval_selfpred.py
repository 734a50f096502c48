"""B4 runner: object-level answers, hypothetical questions, per-task scores (Binder et al.'s 25).

The object-level prompts of the free-text data sets are stored whole in the data files (the
next 5 animals / words of a sequence, a two-sentence story continuation); the multiple-choice and
ethical prompts are built in Binder et al.'s format. Every hypothetical question quotes the
object-level prompt the model answered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmlab.generation import generate
from llmlab.introspection.config import B4Config
from llmlab.introspection.scoring import choice_scores, option_choices, yes_no_choices
from llmlab.introspection.selfpred import (
    ETHICAL_DESCRIPTIONS,
    ETHICAL_INSTRUCTION,
    FREE_DATASETS,
    FREE_PROPERTIES,
    MCQ_INSTRUCTION,
    MCQ_PROPERTIES,
    TASKS,
    choice_hypothetical,
    choice_property,
    free_property,
    hypothetical_prompt,
    options_text,
    parser_for,
    score_task,
)
from llmlab.io import DataError, read_jsonl
from llmlab.models import LoadedModel

FREE_FILES = {
    "animals": "animals.jsonl",
    "english_words": "english_words.jsonl",
    "stories": "stories.jsonl",
}


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def load_selfpred(root: Path, n: int) -> dict[str, list[dict[str, Any]]]:
    """Return the first n items of each data set (n per property for the ethical set)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, file in FREE_FILES.items():
        out[name] = read_jsonl(root / file, required=("id", "prompt"), id_field="id")[:n]
    mcq = read_jsonl(root / "mcq.jsonl", required=("id", "question", "options"), id_field="id")
    for k, r in enumerate(mcq, start=1):
        if not isinstance(r["options"], dict) or sorted(r["options"]) != ["A", "B", "C", "D"]:
            raise DataError(f"{root / 'mcq.jsonl'}:{k}: options must have keys A, B, C, D")
    out["mcq"] = mcq[:n]
    eth = read_jsonl(
        root / "ethical.jsonl",
        required=("id", "question", "options", "property", "matching_option"),
        id_field="id",
    )
    picked = []
    for prop in ETHICAL_DESCRIPTIONS:
        rows = [r for r in eth if r["property"] == prop]
        if not rows:
            raise DataError(f"{root / 'ethical.jsonl'}: no question with property {prop!r}")
        picked.extend(rows[:n])
    for k, r in enumerate(eth, start=1):
        if r["property"] not in ETHICAL_DESCRIPTIONS:
            raise DataError(f"{root / 'ethical.jsonl'}:{k}: unknown property {r['property']!r}")
        if r["matching_option"] not in r["options"]:
            raise DataError(f"{root / 'ethical.jsonl'}:{k}: matching_option not among options")
    out["ethical"] = picked
    return out


def selfpred_records(
    loaded: LoadedModel,
    data: dict[str, list[dict[str, Any]]],
    cfg: B4Config,
    batch_size: int,
) -> list[dict[str, Any]]:
    """Return one record per (task, item): object answer, actual and predicted property."""
    records: list[dict[str, Any]] = []
    # Free-text object level, then the generated and the yes/no hypotheticals.
    free_items = [(ds, item) for ds in FREE_DATASETS for item in data[ds]]
    objects = generate(
        loaded,
        [_user(it["prompt"]) for _, it in free_items],
        max_new_tokens=cfg.object_max_new_tokens,
        batch_size=batch_size,
        stop_strings=["\n"],
        progress=False,
    )
    gen_jobs, yn_jobs = [], []
    for (ds, item), answer in zip(free_items, objects, strict=True):
        for prop in FREE_PROPERTIES:
            rec = {
                "task": f"{ds}.{prop}",
                "item_id": item["id"],
                "object_answer": answer,
                "actual": free_property(answer, prop),
                "hypothetical_answer": None,
            }
            records.append(rec)
            job = (rec, hypothetical_prompt(item["prompt"], prop))
            (yn_jobs if prop == "starts_with_vowel" else gen_jobs).append(job)
    hyp = generate(
        loaded,
        [_user(p) for _, p in gen_jobs],
        max_new_tokens=cfg.hypothetical_max_new_tokens,
        batch_size=batch_size,
        stop_strings=["\n"],
        progress=False,
    )
    for (rec, _), text in zip(gen_jobs, hyp, strict=True):
        rec["hypothetical_answer"] = text
        rec["predicted"] = parser_for(rec["task"].split(".")[1])(text)
    # Multiple-choice and ethical object level: the most likely option letter.
    for ds, letters_, instruction, props in (
        ("mcq", ["A", "B", "C", "D"], MCQ_INSTRUCTION, MCQ_PROPERTIES),
        ("ethical", ["A", "B"], ETHICAL_INSTRUCTION, None),
    ):
        items = data[ds]
        blocks = [options_text(it["question"], it["options"], instruction) for it in items]
        scores = choice_scores(
            loaded,
            [_user(b) for b in blocks],
            [option_choices(loaded, letters_)] * len(items),
            None,
            batch_size,
        )
        for it, block, pick in zip(items, blocks, scores.argmax(), strict=True):
            letter = letters_[pick]
            for prop in props or (it["property"],):
                rec = {
                    "task": f"{ds}.{prop}",
                    "item_id": it["id"],
                    "object_answer": letter,
                    "actual": choice_property(letter, prop, it.get("matching_option")),
                }
                records.append(rec)
                yn_jobs.append((rec, choice_hypothetical(block, prop)))
    yn = choice_scores(
        loaded,
        [_user(p) for _, p in yn_jobs],
        [yes_no_choices(loaded)] * len(yn_jobs),
        None,
        batch_size,
    )
    for (rec, _), lp in zip(yn_jobs, yn.logprobs, strict=True):
        rec["predicted"] = "yes" if lp[0] > lp[1] else "no"
        rec["hypothetical_answer"] = rec["predicted"]
    return records


def selfpred_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Return per-task results and the count of tasks beating their mode baseline."""
    tasks: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        tasks.setdefault(r["task"], []).append(r)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise DataError(f"B4: records of unknown task(s) {unknown} (the tasks: {list(TASKS)})")
    results = {t: score_task(t, tasks.get(t, [])).to_dict() for t in TASKS}
    applicable = [r for r in results.values() if r.get("applicable")]
    return {
        "n_tasks": len(results),
        "n_applicable": len(applicable),
        # Tasks whose property the model's own answers define often enough (selfpred.py).
        "n_valid": sum(r["valid"] for r in results.values()),
        "invalid_tasks": [t for t, r in results.items() if not r["valid"]],
        "n_beating_baseline": sum(r["beats_baseline"] for r in applicable),
        "mean_accuracy_minus_baseline": (
            sum(r["accuracy_minus_baseline"] for r in applicable) / len(applicable)
            if applicable
            else None
        ),
        "tasks": results,
    }
