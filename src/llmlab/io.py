"""Atomic output writing and strict JSONL / JSON / YAML reading.

Every stage writes through these helpers so an interrupted stage never leaves a half-written
file behind: data goes to a temporary file in the same directory, is flushed and fsynced, and
is then renamed over the target (rename is atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml


class DataError(ValueError):
    """A data file is malformed; the message names the file (and line where there is one)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix or target.suffix or ".tmp", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            # mkstemp creates files 0600; outputs are shared artifacts, so use the umask default.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def replace_dir(work: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Rename the finished directory `work` onto `out`, replacing what was there, and return out.

    A directory cannot be renamed over a non-empty one, so an old `out` is first moved aside to
    `<out>.old.partial` (a name DVC outputs ignore); a kill at any instant leaves either the old
    or the new directory whole at `out`, or the old one aside, never a mix.
    """
    work, out = Path(work), Path(out)
    old = out.with_name(out.name + ".old.partial")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    """Write JSON atomically (sorted keys so diffs and hashes are stable)."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL atomically; returns the number of rows written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_json(path: str | os.PathLike[str]) -> Any:
    """Return the parsed JSON document; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Return the parsed YAML document; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise DataError(f"{p}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None


def read_jsonl(
    path: str | os.PathLike[str],
    required: Iterable[str] = (),
    id_field: str | None = None,
    allow_empty: bool = False,
) -> list[dict[str, Any]]:
    """Return the rows of a JSONL file.

    Errors name the file and line: invalid JSON, a row that is not an object, a missing
    required field, a duplicate `id_field` value, or (unless allowed) an empty file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    required = tuple(required)
    rows: list[dict[str, Any]] = []
    seen: dict[Any, int] = {}
    try:
        with open(p, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}"
                    )
                missing = [k for k in required if k not in row]
                if missing:
                    raise DataError(f"{p}:{lineno}: missing field {missing[0]!r}")
                if id_field is not None:
                    key = row.get(id_field)
                    if key in seen:
                        raise DataError(
                            f"{p}:{lineno}: duplicate {id_field} {key!r} (first on line {seen[key]})"
                        )
                    seen[key] = lineno
                rows.append(row)
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not rows and not allow_empty:
        raise DataError(f"{p}: file is empty")
    return rows
