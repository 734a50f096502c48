"""Headline metrics: the few numbers per family that `dvc exp show` compares across runs.

Each family's report stage writes its whole results tree to `data/<family>/results.json` (a stage
out that the markdown reports read) and a headline picked from it to `metrics/<family>.json`, the
stage's DVC metric. Every headline leaf is a number, so each is one sortable column of
`dvc exp show`; a value with an interval becomes `<name>.value`, `<name>.lo`, `<name>.hi`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from llmlab.io import DataError, read_json, write_json

# Per family, so the whole project's `dvc exp show --only-changed` fits a wide terminal.
MAX_LEAVES = 30
DIGITS = 4


def results_path(family: str) -> Path:
    """Return the path of a family's full results tree (a stage out, not a DVC metric)."""
    return Path("data") / family / "results.json"


def _number(v: Any) -> float | int | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, DIGITS)
    raise TypeError(type(v).__name__)


def estimate(d: dict[str, Any] | None, key: str = "value") -> dict[str, float] | None:
    """Return {value, lo, hi} of an estimate dict (`value` or, for correlations, `r`).

    Bounds the estimate does not have are left out; None when the value itself is missing.
    """
    if not d or d.get(key) is None:
        return None
    out = {"value": d[key]}
    if d.get("lo") is not None and d.get("hi") is not None:
        out |= {"lo": d["lo"], "hi": d["hi"]}
    return out


def get(tree: Any, dotted: str) -> Any:
    """Return the value at a dotted path of a results tree, None where any part is absent."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def clean(tree: dict[str, Any], source: str) -> dict[str, Any]:
    """Return the headline with numbers rounded, booleans as 0/1 and absent values left out.

    Anything else (a string, a list) is a DataError naming `source` and the key: a metric that
    is not a number would be a text column that `dvc exp show` can neither sort nor diff.
    """
    out: dict[str, Any] = {}
    for key, v in tree.items():
        if isinstance(v, dict):
            sub = clean(v, f"{source}:{key}")
            if sub:
                out[key] = sub
            continue
        try:
            n = _number(v)
        except TypeError:
            raise DataError(f"{source}: headline {key} is {v!r}, not a number") from None
        if n is not None:
            out[key] = n
    return out


def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return the leaves under dotted keys, as `dvc exp show` names its columns."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= leaves(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_headline(path: str | os.PathLike[str], tree: dict[str, Any]) -> dict[str, Any]:
    """Write the cleaned headline to `path` and return it; more than MAX_LEAVES is a DataError."""
    headline = clean(tree, str(path))
    n = len(leaves(headline))
    if n > MAX_LEAVES:
        raise DataError(f"{path}: {n} headline numbers, at most {MAX_LEAVES} per family")
    write_json(path, headline)
    return headline


def write_results(family: str, results: dict[str, Any]) -> None:
    """Write a family's full results tree (its markdown report and the top-level page read it)."""
    write_json(results_path(family), results)


def read_results(family: str) -> dict[str, Any]:
    """Return a family's full results tree; a missing file is a DataError naming it."""
    return read_json(results_path(family))
