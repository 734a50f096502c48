"""Generate the preference task pool, its topic map and the OOD system prompts.

Deterministic: the same code always yields byte-identical files, so the shipped data can be
checked by regenerating it.

    python -m llmlab.preferences.taskgen --out data/preferences/tasks.jsonl \
        --topics-out data/preferences/topics.json --ood-out data/preferences/ood_prompts.jsonl

(the stage preferences_taskgen runs exactly this after an edit of its inputs).

Tasks come from three sources per topic, in this order (ids are assigned sequentially):
handwritten prompts, handwritten prompts about a novel subject (cheese, cats, ...) that the
novel-topic OOD prompts target, and templates crossed with subject lists. Every prompt, template
and system prompt is in data/preferences/taskgen/*.yaml, which a researcher edits; this module
only combines and validates them.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmlab.io import DataError, read_yaml, write_json, write_jsonl
from llmlab.stage import run_stage

INPUTS = Path("data/preferences/taskgen")


@dataclass(frozen=True)
class Inputs:
    """The generator's editable inputs (data/preferences/taskgen/*.yaml)."""

    topics: tuple[str, ...]
    min_words: int
    max_words: int
    handwritten: dict[str, list[str]]
    novel: dict[str, list[tuple[str, str]]]  # subject -> (topic, prompt)
    novel_patterns: dict[str, str]
    templates: dict[str, list[tuple[str, list[Any]]]]  # topic -> (template, fills)
    category_prompts: dict[str, tuple[str, str]]  # topic -> (love, hate)
    novel_prompts: dict[str, tuple[str, str]]  # subject -> (love, hate)
    competing_pairs: list[tuple[str, str]]
    topic_phrases: dict[str, str]
    personas: list[tuple[str, str, dict[str, int]]]


def load_inputs(root: str | Path = INPUTS) -> Inputs:
    """Return the inputs under `root`; DataError naming the file and field that is missing."""
    root = Path(root)

    def doc(name: str) -> dict[str, Any]:
        data = read_yaml(root / name)
        if not isinstance(data, dict):
            raise DataError(f"{root / name}: expected a mapping at the top level")
        return data

    def field(data: dict[str, Any], key: str, name: str) -> Any:
        if key not in data:
            raise DataError(f"{root / name}: field {key!r} is missing")
        return data[key]

    topics, novel, ood = doc("topics.yaml"), doc("novel.yaml"), doc("ood.yaml")
    templates = doc("templates.yaml")
    try:
        return Inputs(
            topics=tuple(field(topics, "topics", "topics.yaml")),
            min_words=int(field(topics, "min_words", "topics.yaml")),
            max_words=int(field(topics, "max_words", "topics.yaml")),
            handwritten={k: list(v) for k, v in doc("handwritten.yaml").items()},
            novel={
                s: [(r["topic"], r["prompt"]) for r in rows]
                for s, rows in field(novel, "prompts", "novel.yaml").items()
            },
            novel_patterns=dict(field(novel, "patterns", "novel.yaml")),
            templates={
                t: [(r["template"], list(r["fills"])) for r in rows]
                for t, rows in templates.items()
            },
            category_prompts={
                k: (v["love"], v["hate"]) for k, v in field(ood, "category", "ood.yaml").items()
            },
            novel_prompts={
                k: (v["love"], v["hate"]) for k, v in field(ood, "novel", "ood.yaml").items()
            },
            competing_pairs=[(a, b) for a, b in field(ood, "competing_pairs", "ood.yaml")],
            topic_phrases=dict(field(ood, "topic_phrases", "ood.yaml")),
            personas=[
                (r["id"], r["system_prompt"], dict(r["expect"]))
                for r in field(ood, "personas", "ood.yaml")
            ],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{root}: malformed generator input ({type(e).__name__}: {e})") from None


def _fill(template: str, fill: Any) -> str:
    """Return the template with its {} slots filled from one string or a list of strings."""
    args = tuple(fill) if isinstance(fill, list) else (fill,)
    if template.count("{}") != len(args):
        raise ValueError(f"template {template!r} has {template.count('{}')} slots, got {args!r}")
    return template.format(*args)


def _novel_subject(prompt: str, patterns: dict[str, str]) -> str | None:
    """Return the novel subject a prompt mentions, or None; raises if it mentions several."""
    hits = [s for s, pat in patterns.items() if re.search(pat, prompt, re.IGNORECASE)]
    if len(hits) > 1:
        raise ValueError(f"prompt mentions several novel subjects {hits}: {prompt!r}")
    return hits[0] if hits else None


def build_tasks(inp: Inputs) -> list[dict[str, str]]:
    """Return every task row (id, topic, origin, prompt), validated, in id order."""
    rows: list[dict[str, str]] = []
    for topic in inp.topics:
        entries = [("handwritten", p) for p in inp.handwritten[topic]]
        entries += [
            ("handwritten", p) for items in inp.novel.values() for t, p in items if t == topic
        ]
        entries += [
            ("templated", _fill(tpl, f)) for tpl, fills in inp.templates[topic] for f in fills
        ]
        for origin, prompt in entries:
            rows.append(
                {"id": f"t{len(rows) + 1:05d}", "topic": topic, "origin": origin, "prompt": prompt}
            )
    _validate(rows, inp)
    return rows


def _validate(rows: list[dict[str, str]], inp: Inputs) -> None:
    """Raise ValueError if lengths, uniqueness or novel-subject isolation are violated."""
    seen: dict[str, str] = {}
    novel_prompts = {p: s for s, items in inp.novel.items() for _, p in items}
    for row in rows:
        prompt = row["prompt"]
        n = len(prompt.split())
        if not inp.min_words <= n <= inp.max_words:
            raise ValueError(f"{row['id']}: {n} words (allowed {inp.min_words}-{inp.max_words})")
        key = prompt.casefold()
        if key in seen:
            raise ValueError(f"{row['id']}: duplicate prompt (also {seen[key]}): {prompt!r}")
        seen[key] = row["id"]
        # Novel-subject prompts must mention exactly their subject; all others none, so that
        # "You love cheese" targets a known, complete set.
        if _novel_subject(prompt, inp.novel_patterns) != novel_prompts.get(prompt):
            raise ValueError(f"{row['id']}: novel-subject mismatch: {prompt!r}")


def _slug(text: str) -> str:
    """Return a lower-case identifier fragment for a subject such as 'the ocean'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower().removeprefix("the ")).strip("_")


def build_ood(tasks: list[dict[str, str]], inp: Inputs) -> list[dict[str, Any]]:
    """Return the OOD system-prompt rows, with novel-subject targets resolved to task ids."""
    rows: list[dict[str, Any]] = []

    def row(**kw: Any) -> None:
        # Fixed key order (id first) keeps the file readable and diffs small.
        defaults = {
            "target_topic": None,
            "target_task_ids": [],
            "pair_id": None,
            "opposing_topic": None,
            "novel_subject": None,
            "persona_expect": None,
        }
        keys = (
            "id",
            "kind",
            "system_prompt",
            "target_topic",
            "direction",
            "target_task_ids",
            "pair_id",
            "opposing_topic",
            "novel_subject",
            "persona_expect",
        )
        rows.append({k: kw[k] if k in kw else defaults[k] for k in keys})

    for topic, (love, hate) in inp.category_prompts.items():
        for verb, direction, text in (("love", 1, love), ("hate", -1, hate)):
            row(
                id=f"category_{topic}_{verb}",
                kind="category",
                system_prompt=text,
                target_topic=topic,
                direction=direction,
            )
    for subject, (love, hate) in inp.novel_prompts.items():
        ids = [t["id"] for t in tasks if _novel_subject(t["prompt"], inp.novel_patterns) == subject]
        for verb, direction, text in (("love", 1, love), ("hate", -1, hate)):
            row(
                id=f"novel_{_slug(subject)}_{verb}",
                kind="novel_topic",
                system_prompt=text,
                direction=direction,
                target_task_ids=ids,
                novel_subject=subject,
            )
    for a, b in inp.competing_pairs:
        pair_id = f"competing_{a}_{b}"
        for loved, hated in ((a, b), (b, a)):
            text = f"You love {inp.topic_phrases[loved]}, but you hate {inp.topic_phrases[hated]}."
            row(
                id=f"competing_{loved}_over_{hated}",
                kind="competing",
                system_prompt=text,
                target_topic=loved,
                direction=1,
                opposing_topic=hated,
                pair_id=pair_id,
            )
    for suffix, text, expect in inp.personas:
        row(
            id=f"persona_{suffix}",
            kind="persona",
            system_prompt=text,
            direction=0,
            persona_expect=expect,
        )
    return rows


def build_topics(tasks: list[dict[str, str]], inp: Inputs) -> dict[str, Any]:
    """Return the topics.json document: topic names and the task-id -> topic map."""
    return {"topics": list(inp.topics), "task_topics": {t["id"]: t["topic"] for t in tasks}}


def main(argv: list[str] | None = None) -> None:
    """Write the task pool (and optionally topics.json and the OOD prompts)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="tasks.jsonl to write")
    ap.add_argument("--topics-out", type=Path, help="topics.json to write")
    ap.add_argument("--ood-out", type=Path, help="ood_prompts.jsonl to write")
    ap.add_argument("--inputs", type=Path, default=INPUTS, help="directory of the YAML inputs")
    args = ap.parse_args(argv)
    inp = load_inputs(args.inputs)
    tasks = build_tasks(inp)
    n = write_jsonl(args.out, tasks)
    print(f"wrote {n} tasks to {args.out}")
    if args.topics_out is not None:
        write_json(args.topics_out, build_topics(tasks, inp))
        print(f"wrote {len(inp.topics)} topics to {args.topics_out}")
    if args.ood_out is not None:
        n = write_jsonl(args.ood_out, build_ood(tasks, inp))
        print(f"wrote {n} OOD prompts to {args.ood_out}")


if __name__ == "__main__":
    run_stage(main)
