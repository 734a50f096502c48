"""Paths and checked readers shared by the preferences stages.

Every reader validates what the next step relies on (ids unique, splits disjoint, topics
known, activations covering the utilities) and raises a one-line DataError naming the file.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.activations import load_activations, read_index
from llmlab.io import DataError, atomic_path, read_jsonl, write_text
from llmlab.preferences.config import FitSection
from llmlab.preferences.tasks import Task, load_tasks, load_topics
from llmlab.preferences.thurstonian import Edges

ROOT = Path("data/preferences")
SPLIT = ROOT / "split"
POOL = SPLIT / "pool.jsonl"
POOL_TOPICS = SPLIT / "topics.json"
IDS = {"train": SPLIT / "train_ids.txt", "eval": SPLIT / "eval_ids.txt"}
MEASURE = ROOT / "measure"
FIT = ROOT / "fit"
ACTS = ROOT / "activations"
RESULTS = ROOT / "results"
PROBES = Path("models/preferences/probes")
PLOTS = Path("plots/preferences")
UTILITY_FIELDS = ("task_id", "topic", "mu", "sigma", "n_comparisons")


def other(split: str) -> str:
    """Return the name of the other split."""
    return {"train": "eval", "eval": "train"}[split]


def read_ids(path: str | Path) -> list[str]:
    """Return the task ids of a one-id-per-line file; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    ids: list[str] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        tid = line.strip()
        if not tid or tid.startswith("#"):
            continue
        if tid in seen:
            raise DataError(f"{p}:{n}: duplicate task id {tid!r} (first on line {seen[tid]})")
        seen[tid] = n
        ids.append(tid)
    return ids


def write_ids(path: str | Path, ids: Iterable[str]) -> None:
    """Write task ids one per line, atomically."""
    write_text(path, "".join(f"{i}\n" for i in ids))


def check_disjoint(a: Iterable[str], b: Iterable[str], a_name: str, b_name: str) -> None:
    """Return None if no id is in both collections; else DataError naming the first shared id."""
    shared = sorted(set(a) & set(b))
    if shared:
        raise DataError(
            f"task {shared[0]} is in both {a_name} and {b_name} ({len(shared)} shared); "
            "train and eval must be disjoint"
        )


def load_pool(pool: str | Path = POOL, topics: str | Path = POOL_TOPICS) -> dict[str, Task]:
    """Return the split's task pool by id, every task checked against the topic file."""
    tasks = load_tasks(pool)
    mapping = load_topics(topics)
    for t in tasks:
        if t.id not in mapping:
            raise DataError(f"{topics}: task {t.id} has no topic")
        if mapping[t.id] != t.topic:
            raise DataError(
                f"{topics}: task {t.id} has topic {mapping[t.id]!r} but {pool} says {t.topic!r}"
            )
    return {t.id: t for t in tasks}


def split_ids(split: str) -> list[str]:
    """Return a split's task ids after checking they are disjoint from the other split's."""
    ids = read_ids(IDS[split])
    check_disjoint(ids, read_ids(IDS[other(split)]), str(IDS[split]), str(IDS[other(split)]))
    return ids


@dataclass(frozen=True)
class Utilities:
    """Fitted utilities of one run, in file order."""

    ids: list[str]
    topics: list[str]
    mu: np.ndarray
    sigma: np.ndarray
    path: str

    def topic_demeaned(self) -> np.ndarray:
        """Return mu minus the mean mu of each task's topic (within this run)."""
        out = self.mu.copy()
        topics = np.array(self.topics)
        for t in set(self.topics):
            sel = topics == t
            out[sel] -= self.mu[sel].mean()
        return out


def write_utilities(path: str | Path, rows: Sequence[dict[str, object]]) -> None:
    """Write utilities.csv atomically (columns: UTILITY_FIELDS)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(UTILITY_FIELDS))
        w.writeheader()
        w.writerows(rows)


def load_utilities(path: str | Path, topics: dict[str, str] | None = None) -> Utilities:
    """Return a run's utilities; with `topics`, every task must have the same topic there."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    with open(p, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise DataError(f"{p}: no utilities")
    missing = [f for f in UTILITY_FIELDS if f not in rows[0]]
    if missing:
        raise DataError(f"{p}: missing column {missing[0]!r}")
    ids = [r["task_id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{p}: duplicate task id {dup!r}")
    if topics is not None:
        for r in rows:
            if r["task_id"] not in topics:
                raise DataError(f"{p}: task {r['task_id']} is missing from the topic file")
            if topics[r["task_id"]] != r["topic"]:
                raise DataError(
                    f"{p}: task {r['task_id']} has topic {r['topic']!r}, the topic file says "
                    f"{topics[r['task_id']]!r}"
                )
    try:
        mu = np.array([float(r["mu"]) for r in rows])
        sigma = np.array([float(r["sigma"]) for r in rows])
    except ValueError as e:
        raise DataError(f"{p}: non-numeric mu or sigma ({e})") from None
    return Utilities(ids, [r["topic"] for r in rows], mu, sigma, str(p))


def fit_kwargs(fit: FitSection, seed: int) -> dict[str, object]:
    """Return keyword arguments of fit_thurstonian from the fit section."""
    return {
        "method": fit.method,
        "max_iter": fit.max_iter,
        "log_sigma_bounds": tuple(fit.log_sigma_bounds),
        "prior": fit.prior,
        "seed": seed,
    }


def read_outcomes(path: Path) -> list[dict[str, object]]:
    """Return the pair-order rows of outcomes.jsonl or holdout.jsonl (fields checked)."""
    return read_jsonl(path, required=("task_a", "task_b", "p_a", "mass"), allow_empty=True)


def load_edges(path: str | Path, ids: Sequence[str]) -> Edges:
    """Return the measured edges of a run (both orders combined) indexed by `ids` order."""
    return edges_from_rows(read_jsonl(path, required=("task_a", "task_b", "p_a")), ids, path)


def edges_from_rows(rows: Sequence[dict[str, Any]], ids: Sequence[str], path: str | Path) -> Edges:
    """Return edges from pair-order rows {task_a, task_b, p_a} (of `path`), indexed by `ids`.

    P(i > j) is the mean of P(choose i | i shown first) and 1 - P(choose j | j shown first).
    """
    where = {t: k for k, t in enumerate(ids)}
    acc: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        a, b = r["task_a"], r["task_b"]
        for t in (a, b):
            if t not in where:
                raise DataError(f"{path}: task {t} is not in the run's utilities")
        i, j = where[a], where[b]
        key, p = ((i, j), r["p_a"]) if i < j else ((j, i), 1.0 - r["p_a"])
        acc.setdefault(key, []).append(float(p))
    keys = sorted(acc)
    return Edges.from_lists(
        [k[0] for k in keys], [k[1] for k in keys], [float(np.mean(acc[k])) for k in keys]
    )


def features(act_dir: str | Path, layer: int, ids: Sequence[str], what: str) -> np.ndarray:
    """Return float32 activations of `ids` (in order); DataError when the index lacks one.

    Stored activations may be float16 (compact enough to push and re-fit on a laptop); they
    are read as float32, and a non-finite value (a float16 overflow) is refused.
    """
    acts = load_activations(act_dir, layer)
    have = set(acts.ids)
    missing = [i for i in ids if i not in have]
    if missing:
        raise DataError(
            f"{act_dir}: activation index does not match {what}: {len(missing)} task(s) "
            f"missing, e.g. {missing[0]}"
        )
    x = np.asarray(acts.select(list(ids)), dtype=np.float32)
    if not np.isfinite(x).all():
        row, col = np.argwhere(~np.isfinite(x))[0]
        raise DataError(
            f"{act_dir}: layer {layer}, task {ids[row]}, dimension {col} is {x[row, col]} "
            "(float16 overflow: capture with preferences.activations.store_dtype: float32)"
        )
    return x


def captured_layers(act_dir: str | Path) -> list[int]:
    """Return the layers an activation directory holds."""
    return list(read_index(act_dir)["layers"])


def clean_json(obj: Any) -> Any:
    """Return obj ready for strict JSON: numpy scalars unwrapped, non-finite floats None."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
