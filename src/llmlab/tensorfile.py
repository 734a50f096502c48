"""One on-disk format for vectors and probe weights: safetensors plus a JSON sidecar.

Steering vectors, trait directions and probe weights are all "a few named float arrays plus
provenance". Each is written as `<name>.safetensors` (the arrays, no pickle) with a
JSON sidecar beside it (model, layers, kind, fitted settings). Both files open without llmlab,
so nnsight or TransformerLens users can read them directly:

    from safetensors.numpy import load_file
    arrays = load_file("models/inoculation/direction/directions.safetensors")
    meta = json.load(open("models/inoculation/direction/direction.json"))

The sidecar's `kind` names what the arrays are (e.g. "llmlab.inoculation.direction"); the
safetensors header repeats it (and the model), so a file separated from its sidecar still says
what it holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.io import DataError, atomic_path, read_json, write_json

SUFFIX = ".safetensors"


def sidecar_path(tensor_path: str | Path) -> Path:
    """Return the default metadata path of a tensor file: same stem, `.json`."""
    return Path(tensor_path).with_suffix(".json")


def _as_float(name: str, value: Any, dtype: type) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: bf16 has no numpy dtype, so widen first
        value = value.detach().float().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(value, dtype=dtype))
    if not np.isfinite(arr).all():
        raise DataError(f"tensor {name!r}: non-finite values, refusing to save")
    return arr


def save_tensors(
    tensor_path: str | Path,
    tensors: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    kind: str,
    meta_path: str | Path | None = None,
    dtype: type = np.float32,
) -> None:
    """Write named float arrays (numpy or torch) as safetensors and `meta` as the JSON sidecar.

    Both files appear atomically (a reader never sees half a file). The sidecar gets `kind`
    and, per tensor, its shape, so a mismatch between the two files is caught on load.
    `dtype` is float32 for activation-space vectors; probes keep float64 so that a saved probe
    scores exactly as the fitted one.
    """
    from safetensors.numpy import save_file

    path = Path(tensor_path)
    if path.suffix != SUFFIX:
        raise DataError(f"{path}: a tensor file must end in {SUFFIX}")
    arrays = {name: _as_float(name, value, dtype) for name, value in tensors.items()}
    header = {"kind": kind}
    if "model" in meta:
        header["model"] = str(meta["model"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=SUFFIX) as tmp:
        save_file(arrays, str(tmp), metadata=header)
    doc = {**meta, "kind": kind, "shapes": {k: list(v.shape) for k, v in arrays.items()}}
    write_json(Path(meta_path) if meta_path is not None else sidecar_path(path), doc)


def load_tensors(
    tensor_path: str | Path,
    *,
    kind: str,
    required: Sequence[str] = (),
    meta_path: str | Path | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Return (arrays, metadata) of a tensor file; DataError naming the file on any mismatch."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(tensor_path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    meta_file = Path(meta_path) if meta_path is not None else sidecar_path(path)
    meta = read_json(meta_file)
    if not isinstance(meta, dict):
        raise DataError(f"{meta_file}: expected a JSON object")
    if meta.get("kind") != kind:
        raise DataError(f"{meta_file}: kind {meta.get('kind')!r}, expected {kind!r}")
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a complete safetensors file ({e})") from None
    for name in required:
        if name not in arrays:
            raise DataError(f"{path}: tensor {name!r} missing (have {sorted(arrays)})")
    for name, shape in (meta.get("shapes") or {}).items():
        if name in arrays and list(arrays[name].shape) != list(shape):
            raise DataError(
                f"{path}: tensor {name!r} has shape {list(arrays[name].shape)}, "
                f"{meta_file.name} says {shape}"
            )
    return arrays, meta
