"""Task sources beyond the shipped pool: any Hugging Face dataset or a local JSONL / CSV file.

A source (`preferences.tasks.sources`, one entry each) names its origin, how many tasks it
adds, where the text is (a field, or a chat field's first user turn, as WildChat's
`conversation`) and which rows count (`filters`: field == value). A hub dataset is read at its
pinned `revision`; a preset given a `path` reads a local file in the dataset's schema instead.
Rows are read in file order (a Hugging Face dataset: streamed through a seeded shuffle buffer
of 20x the request), whitespace-normalised, kept when they have 3 to 120 words and are not
already in the pool. Ids are `<origin>-<id field or row number>`.
Topics come from the split stage's topic classifier; the train / eval draw stays disjoint.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llmlab.io import DataError, read_jsonl
from llmlab.preferences.config import TaskSource

MIN_WORDS, MAX_WORDS = 3, 120
log = logging.getLogger(__name__)


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

        ds = datasets.load_dataset(
            src.dataset,  # type: ignore[arg-type]
            src.config,
            split=src.split,
            revision=src.revision,
            streaming=True,
        )
    except Exception as e:  # any import or fetch failure means the source is unusable
        raise RuntimeError(f"hub dataset {src.dataset} unreachable: {type(e).__name__}: {e}") from e
    # Streaming has no random access: shuffle within a seeded buffer of 20x the request.
    yield from ds.shuffle(seed=seed, buffer_size=max(1000, 20 * src.count))


def first_user_turn(src: TaskSource, row: dict[str, Any], k: int) -> str | None:
    """Return the content of a chat row's first user turn (None: the chat has none)."""
    turns = row[src.text_field]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(
            f"preferences.tasks.sources.{src.origin}: row {k} field {src.text_field!r} is not a "
            "list of {role, content} turns"
        )
    first = next((t for t in turns if t.get("role") == "user"), None)
    return None if first is None else str(first.get("content") or "")


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
        raw = first_user_turn(src, row, k) if src.conversation else row[src.text_field]
        if raw is None:
            continue
        text = " ".join(str(raw).split())
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
        got = source_tasks(src, seed, seen_text)
        if len(got) < src.count:
            log.warning(
                "preferences.tasks.sources.%s: %d of %d tasks (the source ran out of rows)",
                src.origin,
                len(got),
                src.count,
            )
        for i, p in got:
            if i in ids:
                raise DataError(f"preferences.tasks.sources.{src.origin}: task id {i} repeats")
            ids.add(i)
            seen_text.append(p)
            out.append((src.origin, i, p))
    return out
