"""Task sources beyond the shipped pool: any Hugging Face dataset or a local JSONL / CSV file.

A source (`preferences.tasks.sources`, one entry each) names its origin, how many tasks it
adds, where the text is and which rows count (`filters`: field == value). Rows are read in
file order (a Hugging Face dataset: streamed through a seeded shuffle buffer of 20x the
request), whitespace-normalised, kept when they have 3 to 120 words and are not already in
the pool. Ids are `<origin>-<id field or row number>`.
Topics come from the split stage's topic classifier; the train / eval draw stays disjoint.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llmlab.io import DataError, read_jsonl
from llmlab.preferences.config import TaskSource

MIN_WORDS, MAX_WORDS = 3, 120


def _local_rows(src: TaskSource) -> Iterator[dict[str, Any]]:
    path = Path(src.path or "")
    if not path.is_file():
        raise DataError(f"preferences.tasks.sources.{src.origin}: {path} is not a file")
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            yield from csv.DictReader(fh)
    else:
        yield from read_jsonl(path, required=(src.text_field,))


def _hub_rows(src: TaskSource, seed: int) -> Iterator[dict[str, Any]]:
    try:
        import datasets

        ds = datasets.load_dataset(src.dataset, src.config, split=src.split, streaming=True)  # type: ignore[arg-type]
    except Exception as e:  # any import or fetch failure means the source is unusable
        raise RuntimeError(f"hub dataset {src.dataset} unreachable: {type(e).__name__}: {e}") from e
    # Streaming has no random access: shuffle within a seeded buffer of 20x the request.
    yield from ds.shuffle(seed=seed, buffer_size=max(1000, 20 * src.count))


def _matches(row: dict[str, Any], filters: dict[str, str]) -> bool:
    return all(str(row.get(k)) == v for k, v in filters.items())


def source_tasks(src: TaskSource, seed: int, known: Iterable[str]) -> list[tuple[str, str]]:
    """Return up to `count` (id, prompt) pairs of one source, none already in `known`."""
    rows = _local_rows(src) if src.path else _hub_rows(src, seed)
    seen = {k.casefold() for k in known}
    out: list[tuple[str, str]] = []
    for k, row in enumerate(rows):
        if len(out) >= src.count:
            break
        if not _matches(row, src.filters):
            continue
        if src.text_field not in row:
            raise DataError(
                f"preferences.tasks.sources.{src.origin}: row {k} has no field {src.text_field!r}"
            )
        text = " ".join(str(row[src.text_field]).split())
        if not MIN_WORDS <= len(text.split()) <= MAX_WORDS or text.casefold() in seen:
            continue
        seen.add(text.casefold())
        raw_id = row.get(src.id_field) if src.id_field else k
        out.append((f"{src.origin}-{raw_id}", text))
    return out


def all_source_tasks(
    sources: Sequence[TaskSource], seed: int, known: Iterable[str]
) -> list[tuple[str, str, str]]:
    """Return (origin, id, prompt) of every source in order; DataError on a repeated id."""
    seen_text = list(known)
    out: list[tuple[str, str, str]] = []
    ids: set[str] = set()
    for src in sources:
        for i, p in source_tasks(src, seed, seen_text):
            if i in ids:
                raise DataError(f"preferences.tasks.sources.{src.origin}: task id {i} repeats")
            ids.add(i)
            seen_text.append(p)
            out.append((src.origin, i, p))
    return out
