"""B7 localization: which layer third, which strength bin, which sentence was steered.

Answers are forced choices: the option with the highest log-probability as the answer (read
from the first answer token when every option is one token, else from each whole option), so
every trial gets an answer; the designs are balanced, so a model that always gives the same
answer scores chance. A question shows a signal when the accuracy's Wilson interval lies
above chance.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.introspection.conversation import detection_messages
from llmlab.introspection.examples import Row, row_steer
from llmlab.introspection.scoring import (
    ChoiceScores,
    choice_scores,
    continuation_scores,
    single_token_options,
)
from llmlab.introspection.vectors import VectorBank
from llmlab.io import DataError, read_json
from llmlab.models import LoadedModel
from llmlab.stats import proportion_ci

QUESTION_IDS = ("layer_third", "strength", "sentence")


def load_b7_questions(path: Path) -> dict[str, dict[str, Any]]:
    """Return the localization questions keyed by id; each id of QUESTION_IDS must be there."""
    doc = read_json(path)
    qs = doc.get("questions") if isinstance(doc, dict) else None
    if not isinstance(qs, list):
        raise DataError(f"{path}: 'questions' must be a list")
    by_id = {q.get("id"): q for q in qs if isinstance(q, dict)}
    for qid in QUESTION_IDS:
        q = by_id.get(qid)
        if q is None or not isinstance(q.get("question"), str):
            raise DataError(f"{path}: question {qid!r} missing or without text")
        if qid != "sentence" and (not isinstance(q.get("options"), list) or len(q["options"]) < 2):
            raise DataError(f"{path}: question {qid!r} needs at least two options")
    return by_id


def trial_options(trial: Row, questions: dict[str, dict[str, Any]]) -> list[str]:
    """Return the answer options of a trial (sentence numbers for the sentence question)."""
    if trial["question_id"] == "sentence":
        return [str(k) for k in range(1, int(trial["n_sentences"]) + 1)]
    return list(questions[trial["question_id"]]["options"])


def localization_records(
    loaded: LoadedModel,
    bank: VectorBank,
    trials: Sequence[Row],
    questions: dict[str, dict[str, Any]],
    reply: str,
    batch_size: int,
) -> list[dict[str, Any]]:
    """Return per trial: the true answer, the model's forced choice, its probability."""
    convs = [
        detection_messages(t["context"], reply, questions[t["question_id"]]["question"])
        for t in trials
    ]
    specs = [row_steer(loaded, bank, c, t["steer"]) for c, t in zip(convs, trials, strict=True)]
    options = [trial_options(t, questions) for t in trials]
    # One forward pass per trial when every option is one distinct token, else one per option.
    single = [single_token_options(loaded, c, o) for c, o in zip(convs, options, strict=True)]
    fast = [i for i, s in enumerate(single) if s is not None]
    slow = [i for i, s in enumerate(single) if s is None]
    logprobs: list[np.ndarray] = [np.empty(0)] * len(trials)
    mass = np.zeros(len(trials))
    for idx, scorer in ((fast, "first_token"), (slow, "continuation")):
        if not idx:
            continue
        if scorer == "first_token":
            sc = choice_scores(
                loaded,
                [convs[i] for i in idx],
                [single[i] for i in idx],
                [specs[i] for i in idx],
                batch_size,
            )
        else:
            sc = continuation_scores(
                loaded,
                [convs[i] for i in idx],
                [options[i] for i in idx],
                [specs[i] for i in idx],
                batch_size,
            )
        for k, i in enumerate(idx):
            logprobs[i], mass[i] = sc.logprobs[k], sc.mass[k]
    scores = ChoiceScores(logprobs, mass)
    out = []
    for i, t in enumerate(trials):
        pick = options[i][int(np.argmax(scores.logprobs[i]))]
        if t["answer"] not in options[i]:
            raise DataError(f"trial {t['id']}: answer {t['answer']!r} not among {options[i]}")
        out.append(
            {
                "id": t["id"],
                "question_id": t["question_id"],
                "answer": t["answer"],
                "predicted": pick,
                "correct": pick == t["answer"],
                "p_answer": float(scores.normalised(i)[options[i].index(t["answer"])]),
                "n_options": len(options[i]),
                "choice_mass": float(scores.mass[i]),
                "scorer": "first_token" if single[i] is not None else "continuation",
            }
        )
    return out


def localization_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return per question: accuracy (Wilson CI), chance, answer counts, whether above chance."""
    out: dict[str, Any] = {}
    for qid in QUESTION_IDS:
        rows = [r for r in records if r["question_id"] == qid]
        if not rows:
            continue
        acc = proportion_ci(sum(r["correct"] for r in rows), len(rows)).to_dict()
        chance = float(np.mean([1.0 / r["n_options"] for r in rows]))
        out[qid] = {
            "n": len(rows),
            "accuracy": acc,
            "chance": chance,
            "above_chance": acc["lo"] > chance,
            "predicted_counts": dict(Counter(r["predicted"] for r in rows)),
            "mean_p_answer": float(np.mean([r["p_answer"] for r in rows])),
        }
    out["any_signal"] = any(v["above_chance"] for v in out.values() if isinstance(v, dict))
    return out
