"""Stage preferences_baselines: features of the HOO content baselines, on every task.

- `base/`: the base (non-instruct) model's activations at the same fractional depths, read
  from the plain prompt format (the registry's `base_model` of the selected model, or
  `preferences.hoo.base_model`). A model without a base writes `base/skipped.json` instead.
- `minilm/`: all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm) of the task text, in the
  activation-directory layout (one "layer" 0), so the probes read both the same way.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import numpy as np

from llmlab.activations import INDEX_FILE, CaptureItem, capture_to_disk, layer_file
from llmlab.io import replace_dir, write_json
from llmlab.layers import resolve_layers
from llmlab.models import load_model
from llmlab.params import Params, ParamsError, load_params
from llmlab.preferences import common as c
from llmlab.preferences.config import PreferencesParams
from llmlab.stage import run_stage, seed_everything

log = logging.getLogger(__name__)
MINILM = "all-MiniLM-L6-v2"
SKIPPED = "skipped.json"


def base_model_name(params: Params, cfg: PreferencesParams) -> str | None:
    """Return the registry name of the base model to compare with, or None when there is none."""
    name = cfg.hoo.base_model or params.model_entry.base_model
    if name is not None and name not in params.models:
        raise ParamsError(f"preferences.hoo.base_model: unknown model {name!r}")
    if name == params.model:
        return None
    return name


def write_embeddings(out: Path, ids: list[str], vecs: np.ndarray, model: str) -> None:
    """Write vectors in the activation-directory layout (layer 0), replacing `out` at once."""
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    np.save(work / layer_file(0), vecs.astype(np.float32))
    write_json(
        work / INDEX_FILE,
        {
            "model": model,
            "layers": [0],
            "position": "sentence",
            "hidden_size": int(vecs.shape[1]),
            "dtype": "float32",
            "n_items": len(ids),
            "ids": ids,
        },
    )
    replace_dir(work, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="preferences")
    cfg: PreferencesParams = params.section("preferences")
    seed_everything(cfg.seed)
    pool = c.load_pool()
    ids = c.split_ids("train") + c.split_ids("eval")
    base = base_model_name(params, cfg)
    out = c.ACTS / "base"
    if base is None:
        log.info("model %s has no base model: base-model baseline skipped", params.model)
        shutil.rmtree(out, ignore_errors=True)
        write_json(
            out / SKIPPED, {"model": params.model, "reason": "no base model in the registry"}
        )
    else:
        loaded = load_model(params, name=base)
        layers = resolve_layers(cfg.activations.layers, loaded.n_layers)
        items = [CaptureItem(t, [{"role": "user", "content": pool[t].prompt}]) for t in ids]
        capture_to_disk(
            loaded,
            items,
            layers,
            out,
            position=cfg.activations.position,
            batch_size=cfg.hoo.batch_size,
            store_dtype=cfg.activations.store_dtype,
        )
        del loaded
    if cfg.hoo.content_baseline:
        from llmlab.preferences.hub import embed

        write_embeddings(c.ACTS / "minilm", ids, embed([pool[t].prompt for t in ids]), MINILM)
    else:
        shutil.rmtree(c.ACTS / "minilm", ignore_errors=True)
        write_json(
            c.ACTS / "minilm" / SKIPPED, {"reason": "preferences.hoo.content_baseline is false"}
        )


if __name__ == "__main__":
    run_stage(main)
