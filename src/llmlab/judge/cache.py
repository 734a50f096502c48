"""On-disk judge response cache: one small JSON file per request, written atomically.

The cache lives per user (`$LLMLAB_CACHE/judge`, default `~/.cache/llmlab/judge`), outside any
workspace, so experiments that DVC's queue runs in temporary copies of the repository, and
re-runs after a crash or a failed stage, share it: an answer is paid for once. Files live under <dir>/<first two hex digits of the key>/<key>.json so no directory grows
huge. Writes go through `llmlab.io.write_json` (temp file + rename), so concurrent workers
and a crash can leave at worst a missing entry, never a torn one. Only the request's
identifying fields and the reply are stored: no API key, no base URL, no headers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from llmlab.io import DataError, read_json, write_json

from .base import JudgeReply, Messages

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def user_cache_root() -> Path:
    """Return the per-user llmlab cache directory ($LLMLAB_CACHE, else ~/.cache/llmlab).

    The same variable and default as the converted-model cache of `llmlab.models`; read here
    without importing that module, which loads torch.
    """
    return Path(os.environ.get("LLMLAB_CACHE") or Path.home() / ".cache" / "llmlab")


def resolve_cache_dir(cache_dir: str | None) -> Path | None:
    """Return the judge cache directory a `judge.cache_dir` param names (None: no cache).

    A relative path lies under the per-user cache root, `~` is expanded, an absolute path is
    used as it is.
    """
    if cache_dir is None:
        return None
    path = Path(cache_dir).expanduser()
    return path if path.is_absolute() else user_cache_root() / path


def cache_key(
    kind: str,
    model: str,
    messages: Messages,
    max_tokens: int,
    temperature: float,
    top_logprobs: int | None,
) -> str:
    """Return the sha256 hex digest identifying one request."""
    payload = {
        "v": CACHE_VERSION,
        "kind": kind,
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": float(temperature),
        "top_logprobs": top_logprobs,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """A directory of cached judge replies, safe to share between threads and processes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """Return the file that holds (or would hold) the entry for `key`."""
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> JudgeReply | None:
        """Return the cached reply for `key` (marked cached), or None on a miss."""
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            entry = read_json(p)
            reply = _reply_from_entry(entry)
        except (DataError, KeyError, TypeError, ValueError) as e:
            # an unreadable entry is a miss; the next successful request overwrites it
            log.warning("judge cache: ignoring unreadable entry %s (%s)", p, e)
            return None
        if entry.get("key") != key:
            return None
        return reply

    def put(self, key: str, reply: JudgeReply, model: str, kind: str) -> None:
        """Store `reply` under `key` atomically."""
        entry: dict[str, Any] = {
            "key": key,
            "kind": kind,
            "model": model,
            "text": reply.text,
            "top_logprobs": reply.top_logprobs,
            "input_tokens": reply.input_tokens,
            "output_tokens": reply.output_tokens,
        }
        write_json(self.path(key), entry)


def _reply_from_entry(entry: Any) -> JudgeReply:
    """Return the JudgeReply stored in a cache entry; raises on a malformed entry."""
    if not isinstance(entry, dict):
        raise TypeError("entry is not an object")
    text = entry["text"]
    if not isinstance(text, str):
        raise TypeError("text is not a string")
    raw = entry["top_logprobs"]
    logprobs = None if raw is None else {str(k): float(v) for k, v in dict(raw).items()}
    return JudgeReply(
        text=text,
        top_logprobs=logprobs,
        input_tokens=int(entry["input_tokens"]),
        output_tokens=int(entry["output_tokens"]),
        cached=True,
    )
