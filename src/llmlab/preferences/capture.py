"""Stage preferences_activations: residual activations of the model on every task.

`prompt_last` at fractional depths (0.1 ... 0.9), one file per layer, resumable
(llmlab.activations.capture_to_disk). Two directories: `instruct/` holds every train and eval
task as a lone user message; `ood/` holds the OOD target tasks with each manipulation's
system prompt and without one (ids `<prompt id>|<task id>` and `baseline|<task id>`).
"""

from __future__ import annotations

import argparse

from llmlab.activations import CaptureItem, capture_to_disk
from llmlab.layers import resolve_layers
from llmlab.models import load_model
from llmlab.params import load_params
from llmlab.preferences import common as c
from llmlab.preferences.config import PreferencesParams
from llmlab.preferences.ood_plan import build_groups, capture_keys
from llmlab.preferences.tasks import load_ood_prompts
from llmlab.stage import run_stage, seed_everything


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="preferences")
    cfg: PreferencesParams = params.section("preferences")
    seed_everything(cfg.seed)
    pool = c.load_pool()
    train_ids, eval_ids = c.split_ids("train"), c.split_ids("eval")
    groups = build_groups(
        load_ood_prompts(cfg.ood.prompts),
        pool,
        eval_ids,
        train_ids,
        cfg.ood.n_targets,
        cfg.ood.kinds,
        cfg.seed,
    )
    loaded = load_model(params)
    layers = resolve_layers(cfg.activations.layers, loaded.n_layers)
    a = cfg.activations
    items = [
        CaptureItem(t, [{"role": "user", "content": pool[t].prompt}]) for t in train_ids + eval_ids
    ]
    capture_to_disk(
        loaded,
        items,
        layers,
        c.ACTS / "instruct",
        position=a.position,
        batch_size=a.batch_size,
        store_dtype=a.store_dtype,
    )
    ood = []
    for item_id, system, task in capture_keys(groups):
        msgs = [{"role": "system", "content": system}] if system else []
        ood.append(CaptureItem(item_id, [*msgs, {"role": "user", "content": pool[task].prompt}]))
    capture_to_disk(
        loaded,
        ood,
        layers,
        c.ACTS / "ood",
        position=a.position,
        batch_size=a.batch_size,
        store_dtype=a.store_dtype,
    )


if __name__ == "__main__":
    run_stage(main)
