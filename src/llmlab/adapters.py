"""Saved LoRA adapters: safetensors weights plus a metadata file naming their base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmlab.io import read_json, write_json

METADATA_FILE = "llmlab_adapter.json"


class AdapterError(ValueError):
    """An adapter is missing, incomplete, or belongs to another base model."""


def write_adapter_metadata(adapter_dir: Path, metadata: dict[str, Any]) -> None:
    """Write the adapter's metadata (base model, params, data hashes, final losses)."""
    write_json(adapter_dir / METADATA_FILE, metadata)


def read_adapter_metadata(adapter_dir: Path) -> dict[str, Any]:
    """Return the adapter's metadata; error naming the file when it is absent."""
    meta = adapter_dir / METADATA_FILE
    if not meta.is_file():
        raise AdapterError(f"{adapter_dir}: not an llmlab adapter ({METADATA_FILE} missing)")
    data = read_json(meta)
    if not isinstance(data, dict):
        raise AdapterError(f"{meta}: expected a JSON object")
    return data


def check_adapter(adapter_dir: Path, base_model: str) -> dict[str, Any]:
    """Return the adapter metadata after checking its files and that it fits `base_model`."""
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: adapter directory not found")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise AdapterError(f"{adapter_dir}: adapter_model.safetensors missing")
    meta = read_adapter_metadata(adapter_dir)
    trained_on = meta.get("base_model")
    if trained_on != base_model:
        raise AdapterError(
            f"{adapter_dir}: adapter was trained on {trained_on!r}, not on {base_model!r}"
        )
    return meta
