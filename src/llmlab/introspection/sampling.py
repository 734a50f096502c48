"""Seeded construction of detection, food and localization rows (model-agnostic JSON rows).

A row's `steer` is {"set", "index", "third", "layer", "strength"} (plus "chars" when only one
sentence is steered) or None; it is turned into a vector and an absolute magnitude only when a
model reads the row (see `examples.py`), so rows stay valid for any model of the same depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llmlab.introspection.conversation import answer_text, detection_messages
from llmlab.io import DataError

Row = dict[str, Any]
THIRDS = ("early", "middle", "late")
STRENGTH_BINS = ("slight", "moderate", "strong")


def split_pool(ids: Sequence[str], shares: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Return a seeded partition of ids: each named share, and 'train' for the rest."""
    order = list(np.random.default_rng(seed).permutation(len(ids)))
    out: dict[str, list[str]] = {}
    start = 0
    for name, share in shares.items():
        n = max(1, round(share * len(ids)))
        out[name] = [ids[i] for i in order[start : start + n]]
        start += n
    out["train"] = [ids[i] for i in order[start:]]
    if not out["train"]:
        raise DataError(f"no items left for training after reserving {shares}")
    return out


def cycle_sample(pool: Sequence[Any], n: int, rng: np.random.Generator) -> list[Any]:
    """Return n items drawn by walking through fresh permutations of the pool (few repeats)."""
    if not pool:
        raise DataError("cannot sample from an empty pool")
    out: list[Any] = []
    while len(out) < n:
        out.extend(pool[i] for i in rng.permutation(len(pool)))
    return out[:n]


def balanced(values: Sequence[Any], n: int, rng: np.random.Generator) -> list[Any]:
    """Return n values with counts as equal as possible, in seeded random order."""
    reps = [values[i % len(values)] for i in range(n)]
    return [reps[i] for i in rng.permutation(n)]


def steer_spec(
    vector_set: str,
    index: int,
    third: str,
    strength: float,
    thirds: dict[str, list[int]],
    rng: np.random.Generator,
    mode: str = "single_layer",
) -> Row:
    """Return a steering spec for a third.

    single_layer: one injection layer drawn uniformly from the third, strength in units of its
    residual norm. layer_range (the anchor's): every layer of the third (`layers`), strength an
    absolute magnitude; `layer` is the third's middle layer, whose concept vector is used.
    """
    if strength <= 0:
        raise DataError(f"steering strength must be > 0, got {strength}")
    if mode == "layer_range":
        span = thirds[third]
        return {
            "set": vector_set,
            "index": int(index),
            "third": third,
            "mode": mode,
            "layers": list(span),
            "layer": int(span[len(span) // 2]),
            "strength": float(strength),
        }
    if mode != "single_layer":
        raise DataError(f"steering mode {mode!r} unknown (single_layer, layer_range)")
    layer = int(rng.choice(thirds[third]))
    return {
        "set": vector_set,
        "index": int(index),
        "third": third,
        "layer": layer,
        "strength": float(strength),
    }


def detection_trials(
    n: int,
    contexts: Sequence[Row],
    vector_set: str,
    vector_ids: Sequence[int],
    strengths: Sequence[float],
    thirds: dict[str, list[int]],
    rng: np.random.Generator,
    prefix: str,
    mode: str = "single_layer",
) -> list[Row]:
    """Return n detection trials, half steered, thirds and strengths balanced over the steered."""
    if n % 2:
        raise DataError(f"{prefix}: the number of trials must be even, got {n}")
    n_steered = n // 2
    thirds_seq = balanced(THIRDS, n_steered, rng)
    strengths_seq = balanced(list(strengths), n_steered, rng)
    vectors = cycle_sample(list(vector_ids), n_steered, rng)
    ctx = cycle_sample(list(contexts), n, rng)
    steered_flags = balanced([True, False], n, rng)
    rows: list[Row] = []
    k = 0
    for i, (c, flag) in enumerate(zip(ctx, steered_flags, strict=True)):
        spec = None
        if flag:
            spec = steer_spec(
                vector_set, vectors[k], thirds_seq[k], strengths_seq[k], thirds, rng, mode
            )
            k += 1
        rows.append(
            {
                "id": f"{prefix}_{i:05d}",
                "context_id": c["id"],
                "context": c["text"],
                "steered": flag,
                "steer": spec,
                "question_index": i,
            }
        )
    return rows


def to_training_rows(
    trials: Sequence[Row],
    questions: Sequence[str],
    reply: str,
    variant: str,
    split: str,
    prefix: str = "",
) -> list[Row]:
    """Return training rows (full messages; the label after the answer prefix) for trials."""
    rows = []
    for t in trials:
        label = "yes" if t["steered"] else "no"
        q = questions[t["question_index"] % len(questions)]
        rows.append(
            {
                "id": f"{variant}_{split}_{t['id'].rsplit('_', 1)[-1]}",
                "variant": variant,
                "split": split,
                "context_id": t["context_id"],
                "messages": detection_messages(t["context"], reply, q, answer_text(prefix, label)),
                "answer_prefix": prefix,
                "label": label,
                "true_label": label,
                "label_flipped": False,
                "steered": t["steered"],
                "steer": t["steer"],
            }
        )
    return rows


def food_rows(
    n: int,
    snippets: Sequence[Row],
    question: Sequence[str],
    reply: str,
    rng: np.random.Generator,
    variant: str,
    split: str,
    prefix: str = "",
) -> list[Row]:
    """Return n food/non-food rows (half each, no steering) with the food question."""
    if n % 2:
        raise DataError(f"{variant} {split}: the number of rows must be even, got {n}")
    food = cycle_sample([s for s in snippets if s["is_food"]], n // 2, rng)
    other = cycle_sample([s for s in snippets if not s["is_food"]], n // 2, rng)
    picked = [food[i // 2] if i % 2 == 0 else other[i // 2] for i in range(n)]
    picked = [picked[i] for i in rng.permutation(n)]
    rows = []
    for i, s in enumerate(picked):
        label = "yes" if s["is_food"] else "no"
        q = question[i % len(question)]
        rows.append(
            {
                "id": f"{variant}_{split}_{i:05d}",
                "variant": variant,
                "split": split,
                "context_id": s["id"],
                "messages": detection_messages(s["text"], reply, q, answer_text(prefix, label)),
                "answer_prefix": prefix,
                "label": label,
                "true_label": label,
                "label_flipped": False,
                "steered": False,
                "steer": None,
            }
        )
    return rows


def flip_labels(rows: Sequence[Row], fraction: float, seed: int) -> list[Row]:
    """Return copies of rows with `fraction` of labels swapped, stratified by steered/unsteered.

    Steering stays as it was; only the label (and the answer message) changes, so steering
    carries no information about the label any more.
    """
    rng = np.random.default_rng(seed)
    out = [dict(r, messages=[dict(m) for m in r["messages"]]) for r in rows]
    for flag in (True, False):
        idx = [i for i, r in enumerate(out) if r["steered"] is flag]
        n_flip = round(fraction * len(idx))
        for i in rng.permutation(idx)[:n_flip] if idx else []:
            r = out[int(i)]
            new = "no" if r["label"] == "yes" else "yes"
            r["label"] = new
            r["label_flipped"] = True
            r["messages"][-1]["content"] = answer_text(r.get("answer_prefix", ""), new)
    return out


def sentence_chars(text: str, sentences: Sequence[str], where: str) -> list[tuple[int, int]]:
    """Return the character span of each sentence in text (searched left to right)."""
    spans = []
    pos = 0
    for k, s in enumerate(sentences):
        start = text.find(s, pos)
        if start < 0:
            raise DataError(f"{where}: sentence {k + 1} {s[:40]!r} not found in the text")
        spans.append((start, start + len(s)))
        pos = start + len(s)
    return spans


def localization_trials(
    n_per_question: int,
    contexts: Sequence[Row],
    vector_ids: Sequence[int],
    strengths: Sequence[float],
    thirds: dict[str, list[int]],
    rng: np.random.Generator,
    prefix: str,
    mode: str = "single_layer",
    bins: Sequence[str] = STRENGTH_BINS,
) -> list[Row]:
    """Return steered trials for the three localization questions, with their true answers.

    layer_third: third balanced, moderate strength; strength: bin balanced, middle third;
    sentence: one sentence of the context steered (moderate, middle third), position balanced.
    `bins` names the strengths in order (B7: slight/moderate/strong; Phase C: four
    magnitudes); the moderate strength is the second.
    """
    if len(strengths) != len(bins):
        raise DataError(
            f"localization needs {len(bins)} strengths ({list(bins)}), got {list(strengths)}"
        )
    rows: list[Row] = []
    moderate = strengths[1]
    multi = [c for c in contexts if len(c.get("sentences") or []) >= 2]
    for q in ("layer_third", "strength", "sentence"):
        vecs = cycle_sample(list(vector_ids), n_per_question, rng)
        pool = multi if q == "sentence" else list(contexts)
        ctx = cycle_sample(pool, n_per_question, rng)
        thirds_seq = balanced(THIRDS, n_per_question, rng)
        bins_seq = balanced(list(range(len(bins))), n_per_question, rng)
        for i in range(n_per_question):
            c = ctx[i]
            row: Row = {
                "id": f"{prefix}_{q}_{i:05d}",
                "question_id": q,
                "context_id": c["id"],
                "context": c["text"],
            }
            if q == "layer_third":
                spec = steer_spec("random", vecs[i], thirds_seq[i], moderate, thirds, rng, mode)
                row["answer"] = thirds_seq[i]
            elif q == "strength":
                b = bins_seq[i]
                spec = steer_spec("random", vecs[i], "middle", strengths[b], thirds, rng, mode)
                row["answer"] = bins[b]
            else:
                spans = sentence_chars(c["text"], c["sentences"], f"context {c['id']}")
                k = int(rng.integers(len(spans)))
                spec = steer_spec("random", vecs[i], "middle", moderate, thirds, rng, mode)
                spec["chars"] = list(spans[k])
                row["answer"] = str(k + 1)
                row["n_sentences"] = len(spans)
            row["steer"] = spec
            rows.append(row)
    return rows
