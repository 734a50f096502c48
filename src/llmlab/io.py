"""Atomic output writing and strict JSONL / JSON / YAML reading.

Every stage writes through these helpers so an interrupted stage never leaves a half-written
file behind: data goes to a temporary file in the same directory, is flushed and fsynced, and
is then renamed over the target (rename is atomic on POSIX within one filesystem). A write
that fails for lack of space (or any other OS error) names the output it was writing.

Readers name the file and the real line of a problem: JSONL rows carry the line they came
from (blank lines count), and YAML refuses a key given twice in one mapping.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml


class DataError(ValueError):
    """A data file is malformed; the message names the file (and line where there is one)."""


class OutputError(OSError):
    """An output could not be written; the message names the output and the reason."""


class MissingKeyError(DataError, KeyError):
    """A key a stage needs is absent from a data file; still a KeyError for `except KeyError`."""

    __str__ = BaseException.__str__  # KeyError would quote the whole message


class JsonObject(dict[str, Any]):
    """A JSON object read from a file: `obj[key]` on a missing key names the file and the key.

    Stages index metadata directly (`read_json(p)["runs"]`); without this a file missing a
    key surfaced as a bare KeyError naming neither the file nor what it lacked.
    """

    __slots__ = ("where",)

    def __init__(self, obj: dict[str, Any], where: str) -> None:
        super().__init__(obj)
        self.where = where

    def __missing__(self, key: str) -> Any:
        raise MissingKeyError(f"{self.where}: missing key {key!r}")


class JsonlRow(JsonObject):
    """One row of a JSONL file: a plain dict that also knows its 1-based line in the file."""

    __slots__ = ("lineno",)

    def __init__(self, row: dict[str, Any], path: Path, lineno: int) -> None:
        super().__init__(row, f"{path}:{lineno}")
        self.lineno = lineno


def numbered(rows: Iterable[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line in its file, row) for rows from `read_jsonl`, even after rows were dropped."""
    for row in rows:
        if not isinstance(row, JsonlRow):
            raise TypeError(f"row {row!r:.60} was not read by read_jsonl: its line is unknown")
        yield row.lineno, row


# A full disk or quota shows up wherever the bytes happen to be written (often in a library,
# on a file descriptor with no name); these are relabelled with the output being written.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def naming_output(target: str | os.PathLike[str], any_error: bool = False) -> Iterator[None]:
    """Turn an OS error raised inside the block into an OutputError naming `target`.

    Only a full disk or quota by default (the block may read inputs whose own errors name
    them); every OS error when `any_error` (the block only writes `target`).
    """
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        if not (any_error or e.errno in _NO_SPACE):
            raise
        raise OutputError(f"{target}: cannot write output ({e.strerror or e})") from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    target = Path(path)
    with naming_output(target, any_error=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=suffix or target.suffix or ".tmp", dir=target.parent
        )
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with naming_output(target):
            yield tmp
        with naming_output(target, any_error=True):
            if tmp.is_file():
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                # mkstemp makes files 0600; outputs are shared artifacts, so use the umask default.
                os.chmod(tmp, 0o666 & ~current_umask())
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
    with naming_output(out, any_error=True):
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new empty directory beside `out`; if the block succeeds it replaces `out` whole.

    The block fills the directory; on success it gets the umask's default mode and is renamed
    onto `out` by `replace_dir`; on any error it is removed and `out` is left as it was.
    """
    out = Path(out)
    with naming_output(out, any_error=True):
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with naming_output(out):
            yield work
        with naming_output(out, any_error=True):
            # mkdtemp makes directories 0700; outputs are shared artifacts (DVC cache, remote).
            os.chmod(work, 0o777 & ~current_umask())
        replace_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def current_umask() -> int:
    """Return the process umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def read_json(path: str | os.PathLike[str], required: Mapping[str, type] | None = None) -> Any:
    """Return the parsed JSON document; errors name the file.

    With `required` ({key: type}) the document must be an object holding each key with a
    value of that type, so a file of the wrong shape fails here, naming the file and the key,
    before a stage spends time (loading a model) and fails later without a name.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"), object_hook=lambda o: JsonObject(o, str(p)))
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    if required is not None:
        if not isinstance(doc, dict):
            raise DataError(f"{p}: expected a JSON object, got {_json_kind(doc)}")
        for key, kind in required.items():
            if key not in doc:
                raise DataError(f"{p}: missing key {key!r}")
            if not isinstance(doc[key], kind) or (kind is not bool and isinstance(doc[key], bool)):
                raise DataError(
                    f"{p}: {key!r} must be {_JSON_KINDS.get(kind, kind.__name__)}, "
                    f"got {_json_kind(doc[key])}"
                )
    return doc


_JSON_KINDS: dict[Any, str] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    type(None): "null",
}


def _json_kind(value: Any) -> str:
    # bool before int: True is an int to Python, not to JSON
    for kind in (bool, dict, list, str, int, float, type(None)):
        if isinstance(value, kind):
            return _JSON_KINDS[kind]
    return type(value).__name__


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping gives one key twice (YAML forbids it; PyYAML would keep the last silently)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads 1e-3 as a float, as YAML 1.2 does.

    PyYAML follows YAML 1.1, where an exponent without a dot (`lr: 1e-4`) is a string; DVC
    reads params.yaml as YAML 1.2 (a float), so both now see the same value.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the base class reports unhashable keys
            if key in first_line:
                raise _DuplicateKey(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {first_line[key]})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Return the parsed YAML document; errors name the file and line (duplicate keys too)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        return yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except _DuplicateKey as e:
        assert e.problem_mark is not None
        raise DataError(f"{p}:{e.problem_mark.line + 1}: {e.problem}") from None
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
    """Return the rows of a JSONL file, each a JsonlRow that knows its line (see `numbered`).

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
                    where = f"{p}:{lineno}"
                    row = json.loads(line, object_hook=lambda o, w=where: JsonObject(o, w))
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
                    if isinstance(key, dict | list):
                        raise DataError(
                            f"{p}:{lineno}: {id_field} must be a string or a number, got {key!r}"
                        )
                    if key in seen:
                        raise DataError(
                            f"{p}:{lineno}: duplicate {id_field} {key!r} (first on line {seen[key]})"
                        )
                    seen[key] = lineno
                rows.append(JsonlRow(row, p, lineno))
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not rows and not allow_empty:
        raise DataError(f"{p}: file is empty")
    return rows
