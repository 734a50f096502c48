"""Stage foundation_capture: residual activations of the selected model on a prompt sample.

Proves the wiring end to end: params -> model registry -> chat template -> activation capture
streamed to one file per layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmlab.activations import CaptureItem, capture_to_disk
from llmlab.io import write_jsonl
from llmlab.layers import resolve_layers
from llmlab.models import load_model
from llmlab.params import load_params
from llmlab.prompt_pool import general_prompt_pool
from llmlab.stage import run_stage, seed_everything


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prompts-out", default="data/foundation/prompts.jsonl")
    ap.add_argument("--out", default="data/foundation/activations")
    args = ap.parse_args()
    params = load_params(args.params, family="foundation")
    cfg = params.section("foundation")
    seed_everything(cfg.seed)
    pool = general_prompt_pool(cfg.n_prompts, seed=cfg.seed)
    loaded = load_model(params)
    layers = resolve_layers(cfg.layers, loaded.n_layers)
    items = [CaptureItem(p.id, [{"role": "user", "content": p.prompt}]) for p in pool]
    capture_to_disk(
        loaded, items, layers, Path(args.out), position=cfg.position, batch_size=cfg.batch_size
    )
    write_jsonl(args.prompts_out, [{"id": p.id, "kind": p.kind, "prompt": p.prompt} for p in pool])


if __name__ == "__main__":
    run_stage(main)
