"""The finished LoRA adapter directory: weights, metadata and training curve, renamed into place.

`write_output` fills a staging directory beside `out_dir` (peft's safetensors adapter,
`llmlab_adapter.json` with the run's metadata, `curve.json` with the monitor's curve rows) and
renames it onto `out_dir`, so the output appears only when complete. `curve.json` is the curve
of record for readers of an adapter (family reports and figures, library calls outside the
pipeline, which get no dvclive directory); dvclive draws the same rows live during the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmlab.adapters import write_adapter_metadata
from llmlab.io import staged_dir, write_json

CURVE_FILE = "curve.json"


def write_output(
    out_dir: Path, model: Any, meta: dict[str, Any], curve: list[dict[str, Any]]
) -> None:
    """Write adapter, metadata and curve into a directory beside out_dir that then replaces it."""
    with staged_dir(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        # peft writes a template model card; the metadata file is the record that matters.
        (staging / "README.md").unlink(missing_ok=True)
        write_adapter_metadata(staging, meta)
        write_json(staging / CURVE_FILE, curve)
