"""Task pool, topic map and OOD system prompts for the preferences experiments.

Files (under data/preferences/, written by `llmlab.preferences.taskgen`):

- tasks.jsonl: one task per line with `id`, `topic`, `origin`, `prompt`.
- topics.json: `{"topics": [...], "task_topics": {task_id: topic}}`.
- ood_prompts.jsonl: system-prompt manipulations. `direction` is +1 (love) / -1 (hate) for
  the target; for "competing" prompts the target is the loved topic (+1) and
  `opposing_topic` is the hated one; personas have direction 0 and a `persona_expect` map.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.io import DataError, numbered, read_json, read_jsonl

# Shipped tasks are handwritten or templated; the hub sources join the pool when reachable.
ORIGINS = frozenset({"handwritten", "templated", "gsm8k", "alpaca", "wildchat"})
OOD_KINDS = frozenset({"category", "novel_topic", "competing", "persona"})
TASK_FIELDS = ("id", "topic", "origin", "prompt")


@dataclass(frozen=True)
class Task:
    """One task the model may choose to complete."""

    id: str
    topic: str
    origin: str
    prompt: str


@dataclass(frozen=True)
class OodPrompt:
    """One system-prompt manipulation for the out-of-distribution step."""

    id: str
    kind: str
    system_prompt: str
    target_topic: str | None
    direction: int
    target_task_ids: tuple[str, ...] = ()
    pair_id: str | None = None
    opposing_topic: str | None = None
    novel_subject: str | None = None
    persona_expect: dict[str, int] = field(default_factory=dict, hash=False)


def load_tasks(path: str | Path) -> list[Task]:
    """Return the tasks in file order.

    Raises DataError (a ValueError) naming the file and line for invalid JSON, a missing or
    non-string field, an unknown origin, or a duplicate id (the message names the id).
    """
    p = Path(path)
    rows = read_jsonl(p, required=TASK_FIELDS, id_field="id")
    tasks = []
    for lineno, row in numbered(rows):
        for key in TASK_FIELDS:
            if not isinstance(row[key], str) or not row[key].strip():
                raise DataError(f"{p}:{lineno}: field {key!r} must be a non-empty string")
        if row["origin"] not in ORIGINS:
            raise DataError(f"{p}:{lineno}: origin {row['origin']!r} not in {sorted(ORIGINS)}")
        tasks.append(Task(**{k: row[k] for k in TASK_FIELDS}))
    return tasks


def load_topic_names(path: str | Path) -> list[str]:
    """Return the ordered topic names listed in topics.json."""
    doc = read_json(path)
    names = doc.get("topics") if isinstance(doc, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: 'topics' must be a list of strings")
    return names


def load_topics(path: str | Path) -> dict[str, str]:
    """Return the task-id -> topic map from topics.json, checked against its topic list."""
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("task_topics"), dict):
        raise DataError(f"{path}: expected an object with a 'task_topics' object")
    names = set(load_topic_names(path))
    mapping: dict[str, str] = doc["task_topics"]
    for task_id, topic in mapping.items():
        if topic not in names:
            raise DataError(f"{path}: task {task_id!r} has topic {topic!r} not in 'topics'")
    return dict(mapping)


def check_topics(tasks: Iterable[Task], topics: Mapping[str, str] | Collection[str]) -> None:
    """Return None if every task's topic is known; else raise ValueError naming the task id.

    `topics` is either a task-id -> topic map (the task must be present with the same topic)
    or a collection of topic names (the task's topic must be one of them).
    """
    for task in tasks:
        if isinstance(topics, Mapping):
            if task.id not in topics:
                raise ValueError(f"task {task.id}: no topic in the topic map")
            if topics[task.id] != task.topic:
                raise ValueError(
                    f"task {task.id}: topic {task.topic!r} but the topic map says "
                    f"{topics[task.id]!r}"
                )
        elif task.topic not in topics:
            raise ValueError(f"task {task.id}: topic {task.topic!r} is not a known topic")


def _apportion(total: int, weights: Mapping[str, int], caps: Mapping[str, int]) -> dict[str, int]:
    """Return integer shares of `total` proportional to `weights`, each at most its cap.

    Largest-remainder rounding, ties broken by key so the result is deterministic.
    """
    wsum = sum(weights.values())
    shares = {k: min(caps[k], total * w // wsum) if wsum else 0 for k, w in weights.items()}
    # Remainders of the exact proportional share decide who gets the leftover units.
    order = sorted(weights, key=lambda k: (-((total * weights[k]) % max(wsum, 1)), k))
    left = total - sum(shares.values())
    while left > 0:
        progressed = False
        for k in order:
            if left and shares[k] < caps[k]:
                shares[k] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"cannot place {left} more tasks within the per-topic limits")
    return shares


def split_tasks(
    tasks: Iterable[Task],
    n_train: int,
    n_eval: int,
    seed: int,
    exclude_ids: Iterable[str] = (),
) -> tuple[list[Task], list[Task]]:
    """Return disjoint (train, eval) lists drawn from tasks not in `exclude_ids`.

    Stratified by topic: each topic's share of both lists matches its share of the pool
    (largest-remainder rounding). The draw is fixed by `seed`; outputs keep input order.
    Raises ValueError naming an id if a task id repeats (the lists could overlap) or an
    excluded id slipped through, and ValueError if the sizes exceed the pool.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"sizes must be non-negative, got n_train={n_train}, n_eval={n_eval}")
    excluded = set(exclude_ids)
    all_tasks = list(tasks)
    seen: set[str] = set()
    for t in all_tasks:
        if t.id in seen:
            raise ValueError(f"duplicate task id {t.id}: train and eval could overlap")
        seen.add(t.id)
    pool = [t for t in all_tasks if t.id not in excluded]
    if n_train + n_eval > len(pool):
        raise ValueError(
            f"requested {n_train} train + {n_eval} eval tasks but only {len(pool)} are "
            f"available after excluding {len(all_tasks) - len(pool)}"
        )
    by_topic: dict[str, list[Task]] = {}
    for t in pool:
        by_topic.setdefault(t.topic, []).append(t)
    sizes = {k: len(v) for k, v in by_topic.items()}
    n_tr = _apportion(n_train, sizes, sizes)
    n_ev = _apportion(n_eval, sizes, {k: sizes[k] - n_tr[k] for k in sizes})
    rng = random.Random(seed)
    train_ids: set[str] = set()
    eval_ids: set[str] = set()
    for topic in sorted(by_topic):
        members = sorted(by_topic[topic], key=lambda t: t.id)
        rng.shuffle(members)
        train_ids.update(t.id for t in members[: n_tr[topic]])
        eval_ids.update(t.id for t in members[n_tr[topic] : n_tr[topic] + n_ev[topic]])
    # Defensive: these hold by construction, but a silent leak would invalidate held-out results.
    leaked = sorted((train_ids & eval_ids) | ((train_ids | eval_ids) & excluded))
    if leaked:
        raise ValueError(f"task {leaked[0]} would appear in both splits or is excluded")
    train = [t for t in pool if t.id in train_ids]
    evals = [t for t in pool if t.id in eval_ids]
    return train, evals


def _ood_from_row(p: Path, lineno: int, row: dict[str, Any]) -> OodPrompt:
    """Return one validated OodPrompt; raises DataError naming file and line."""
    where = f"{p}:{lineno}"
    kind, direction = row["kind"], row["direction"]
    if kind not in OOD_KINDS:
        raise DataError(f"{where}: kind {kind!r} not in {sorted(OOD_KINDS)}")
    if not isinstance(row["system_prompt"], str) or not row["system_prompt"].strip():
        raise DataError(f"{where}: system_prompt must be a non-empty string")
    if isinstance(direction, bool) or direction not in (-1, 0, 1):
        raise DataError(f"{where}: direction must be -1, 0 or 1, got {direction!r}")
    target = row.get("target_topic")
    ids = row.get("target_task_ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{where}: target_task_ids must be a list of task ids")
    expect = row.get("persona_expect") or {}
    if kind in ("category", "competing") and not target:
        raise DataError(f"{where}: {kind} prompt needs a target_topic")
    if kind in ("novel_topic", "persona") and target is not None:
        raise DataError(f"{where}: {kind} prompt must have target_topic null")
    if kind == "novel_topic" and not ids:
        raise DataError(f"{where}: novel_topic prompt needs target_task_ids")
    if kind == "competing" and not (row.get("pair_id") and row.get("opposing_topic")):
        raise DataError(f"{where}: competing prompt needs pair_id and opposing_topic")
    if kind == "persona" and (direction != 0 or not expect):
        raise DataError(f"{where}: persona prompt needs direction 0 and a persona_expect map")
    if kind != "persona" and direction == 0:
        raise DataError(f"{where}: {kind} prompt needs direction +1 or -1")
    return OodPrompt(
        id=row["id"],
        kind=kind,
        system_prompt=row["system_prompt"],
        target_topic=target,
        direction=direction,
        target_task_ids=tuple(ids),
        pair_id=row.get("pair_id"),
        opposing_topic=row.get("opposing_topic"),
        novel_subject=row.get("novel_subject"),
        persona_expect={str(k): int(v) for k, v in expect.items()},
    )


def load_ood_prompts(path: str | Path) -> list[OodPrompt]:
    """Return the OOD system prompts in file order.

    Errors name the file and line: invalid JSON, missing field, duplicate id, unknown kind,
    bad direction, or fields inconsistent with the kind.
    """
    p = Path(path)
    rows = read_jsonl(p, required=("id", "kind", "system_prompt", "direction"), id_field="id")
    return [_ood_from_row(p, n, r) for n, r in numbered(rows)]
