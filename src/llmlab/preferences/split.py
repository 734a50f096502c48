"""Stage preferences_split: the task pool and its disjoint train / eval draw.

The pool is the shipped task file, plus public sources when `preferences.tasks.hub` asks for
them and the hub answers. Sizes are the runs' `n_tasks`; the draw is stratified by topic and
seeded; ids in `exclude_ids_file` are never drawn. Outputs (data/preferences/split/):
pool.jsonl, topics.json, train_ids.txt, eval_ids.txt (each split is the other's exclude list).
"""

from __future__ import annotations

import argparse
import logging

from llmlab.io import DataError, write_json, write_jsonl
from llmlab.params import load_params
from llmlab.preferences import common as c
from llmlab.preferences.tasks import (
    check_topics,
    load_tasks,
    load_topic_names,
    load_topics,
    split_tasks,
)
from llmlab.stage import run_stage

log = logging.getLogger(__name__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    cfg = load_params(args.params).section("preferences")
    tasks = load_tasks(cfg.tasks.pool)
    names = load_topic_names(cfg.tasks.topics)
    mapping = load_topics(cfg.tasks.topics)
    try:
        check_topics(tasks, mapping)
    except ValueError as e:
        raise DataError(f"{cfg.tasks.topics}: {e}") from None
    if cfg.tasks.hub:
        from llmlab.preferences.hub import hub_tasks

        try:
            extra = hub_tasks(cfg.tasks.hub, cfg.seed, tasks, names)
        except RuntimeError as e:
            if cfg.tasks.hub_required:
                raise DataError(f"preferences.tasks.hub: {e}") from None
            log.warning("hub sources skipped: %s", e)
            extra = []
        tasks = tasks + extra
        mapping.update({t.id: t.topic for t in extra})
    exclude = c.read_ids(cfg.tasks.exclude_ids_file) if cfg.tasks.exclude_ids_file else []
    try:
        train, evals = split_tasks(tasks, cfg.train.n_tasks, cfg.eval.n_tasks, cfg.seed, exclude)
    except ValueError as e:
        raise DataError(f"preferences split: {e}") from None
    c.check_disjoint([t.id for t in train], [t.id for t in evals], "train", "eval")
    write_jsonl(
        c.POOL,
        [{"id": t.id, "topic": t.topic, "origin": t.origin, "prompt": t.prompt} for t in tasks],
    )
    write_json(c.POOL_TOPICS, {"topics": names, "task_topics": {t.id: t.topic for t in tasks}})
    c.write_ids(c.IDS["train"], [t.id for t in train])
    c.write_ids(c.IDS["eval"], [t.id for t in evals])
    log.info("pool %d tasks; train %d, eval %d", len(tasks), len(train), len(evals))


if __name__ == "__main__":
    run_stage(main)
