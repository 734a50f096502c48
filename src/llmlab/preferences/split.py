"""Stage preferences_split: the task pool and its disjoint train / eval draw.

The pool is the shipped task file, plus public sources when `preferences.tasks.hub` asks for
them and the hub answers. Sizes are the runs' `n_tasks`; the draw is stratified by topic and
seeded; ids in `exclude_ids_file` are never drawn. Outputs (data/preferences/split/):
pool.jsonl, topics.json, train_ids.txt, eval_ids.txt (each split is the other's exclude list)
and topic_check.json (with hub tasks: the topic classifier's agreement with the hand-labelled
check set, and how many hub topics came from the judge, MiniLM or the source itself).
"""

from __future__ import annotations

import argparse
import logging

from llmlab.io import DataError, write_json, write_jsonl
from llmlab.judge import JudgeConfig, make_judge
from llmlab.judge.judge import Judge
from llmlab.models import load_model
from llmlab.params import Params, load_params
from llmlab.preferences import common as c
from llmlab.preferences.tasks import (
    Task,
    check_topics,
    load_tasks,
    load_topic_names,
    load_topics,
    split_tasks,
)
from llmlab.stage import run_stage

log = logging.getLogger(__name__)


def build_judge(params: Params) -> Judge:
    """Return the judge of params `judge:` (a local judge runs the selected model)."""
    cfg: JudgeConfig = params.section("judge")
    if cfg.backend != "local":
        return make_judge(cfg)
    loaded = load_model(params)
    return make_judge(cfg, local_model=loaded.model, local_tokenizer=loaded.tokenizer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="preferences")
    cfg = params.section("preferences")
    tasks = load_tasks(cfg.tasks.pool)
    names = load_topic_names(cfg.tasks.topics)
    mapping = load_topics(cfg.tasks.topics)
    try:
        check_topics(tasks, mapping)
    except ValueError as e:
        raise DataError(f"{cfg.tasks.topics}: {e}") from None
    topic_report: dict[str, object] = {"classifier": None, "reason": "no outside tasks to label"}
    if cfg.tasks.hub or cfg.tasks.sources:
        from llmlab.preferences.hub import hub_tasks
        from llmlab.preferences.sources import all_source_tasks
        from llmlab.preferences.topics import agreement, classify, load_check_set

        check = load_check_set(cfg.tasks.topic_check, names)
        judge = build_judge(params) if cfg.tasks.topic_classifier == "judge" else None
        try:
            extra, counts = hub_tasks(cfg.tasks.hub, cfg.seed, tasks, names, judge)
            raw = all_source_tasks(
                cfg.tasks.sources, cfg.seed, [t.prompt for t in (*tasks, *extra)]
            )
        except RuntimeError as e:
            if cfg.tasks.hub_required:
                raise DataError(f"preferences.tasks (hub or sources): {e}") from None
            log.warning("hub sources skipped: %s", e)
            extra, counts, raw = [], {}, []
        guessed, source_methods = classify([p for _o, _i, p in raw], tasks, names, judge)
        extra += [
            Task(i, topic, origin, p) for (origin, i, p), topic in zip(raw, guessed, strict=True)
        ]
        got, methods = classify([t.prompt for t in check], tasks, names, judge)
        topic_report = {
            "classifier": cfg.tasks.topic_classifier,
            "check_set": cfg.tasks.topic_check,
            "check_methods": {m: methods.count(m) for m in sorted(set(methods))},
            "agreement": agreement(got, [t.topic for t in check]),
            "hub_topics_by_method": counts,
            "source_topics_by_method": {
                m: source_methods.count(m) for m in sorted(set(source_methods))
            },
            "tasks_by_origin": {
                o: sum(t.origin == o for t in extra) for o in sorted({t.origin for t in extra})
            },
        }
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
    write_json(c.SPLIT / "topic_check.json", topic_report)
    log.info("pool %d tasks; train %d, eval %d", len(tasks), len(train), len(evals))


if __name__ == "__main__":
    run_stage(main)
