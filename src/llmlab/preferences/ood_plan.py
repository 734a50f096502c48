"""Target groups of the OOD step: which tasks each system prompt is expected to move, and how.

A group is one (manipulation, target set, expected sign) point of the OOD correlation:
category prompts move their topic; novel-topic prompts move the handwritten tasks about their
subject; a competing "love X, hate Y" prompt gives two groups (X up, Y down); a persona gives
one group per topic in its expectation map. Topic targets are drawn (seeded, per topic, so
every manipulation of a topic shares them) from the eval split, then the train split.
Every group also has as many off-target tasks: measured tasks of topics the prompt is not
about (none of its target, opposing or persona topics), drawn per group, for specificity.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from llmlab.io import DataError
from llmlab.preferences.tasks import OodPrompt, Task

BASELINE = "baseline"


@dataclass(frozen=True)
class Group:
    """One point of the OOD analysis."""

    id: str
    prompt: OodPrompt
    kind: str
    label: str  # topic or novel subject
    direction: int  # expected sign of the shift in preference for the targets
    target_ids: tuple[str, ...]
    exclude_topics: frozenset[str]
    exclude_ids: frozenset[str]
    off_target_ids: tuple[str, ...] = ()


def _pick(ids: Sequence[str], k: int, key: str, seed: int) -> list[str]:
    """Return k ids drawn with a seed derived from `key`, so a topic's draw never varies."""
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16)
    pool = sorted(ids)
    random.Random(h).shuffle(pool)
    return sorted(pool[:k])


def topic_targets(
    topic: str,
    eval_ids: Sequence[str],
    train_ids: Sequence[str],
    pool: dict[str, Task],
    k: int,
    seed: int,
) -> list[str]:
    """Return up to k target tasks of a topic (eval split first); DataError if there are none."""
    first = [i for i in eval_ids if pool[i].topic == topic]
    picked = _pick(first, k, topic, seed)
    if len(picked) < k:
        rest = [i for i in train_ids if pool[i].topic == topic]
        picked += _pick(rest, k - len(picked), topic + ":train", seed)
    if not picked:
        raise DataError(f"OOD: no measured task of topic {topic!r} to serve as a target")
    return picked


def build_groups(
    prompts: Sequence[OodPrompt],
    pool: dict[str, Task],
    eval_ids: Sequence[str],
    train_ids: Sequence[str],
    n_targets: int,
    kinds: Sequence[str],
    seed: int,
) -> list[Group]:
    """Return the OOD groups of the selected manipulation kinds, in file order."""
    groups: list[Group] = []

    def topic_group(p: OodPrompt, topic: str, sign: int, exclude: set[str]) -> Group:
        if topic not in {t.topic for t in pool.values()}:
            raise DataError(f"OOD prompt {p.id}: topic {topic!r} is missing from the topic file")
        targets = topic_targets(topic, eval_ids, train_ids, pool, n_targets, seed)
        return Group(
            f"{p.id}:{topic}",
            p,
            p.kind,
            topic,
            sign,
            tuple(targets),
            frozenset(exclude),
            frozenset(),
        )

    for p in prompts:
        if p.kind not in kinds:
            continue
        if p.kind == "category":
            assert p.target_topic
            groups.append(topic_group(p, p.target_topic, p.direction, {p.target_topic}))
        elif p.kind == "competing":
            assert p.target_topic and p.opposing_topic
            both = {p.target_topic, p.opposing_topic}
            groups.append(topic_group(p, p.target_topic, p.direction, both))
            groups.append(topic_group(p, p.opposing_topic, -p.direction, both))
        elif p.kind == "persona":
            for topic, sign in sorted(p.persona_expect.items()):
                groups.append(topic_group(p, topic, sign, {topic}))
        else:
            missing = [i for i in p.target_task_ids if i not in pool]
            if missing:
                raise DataError(f"OOD prompt {p.id}: target task {missing[0]} is not in the pool")
            subject = p.novel_subject or p.id
            targets = _pick(p.target_task_ids, n_targets, subject, seed)
            groups.append(
                Group(
                    f"{p.id}:{subject}",
                    p,
                    p.kind,
                    subject,
                    p.direction,
                    tuple(targets),
                    frozenset(),
                    frozenset(p.target_task_ids),
                )
            )
    if not groups:
        raise DataError("OOD: no manipulation selected (check preferences.ood.kinds)")
    return [with_off_targets(g, pool, eval_ids, train_ids, n_targets, seed) for g in groups]


def with_off_targets(
    g: Group,
    pool: dict[str, Task],
    eval_ids: Sequence[str],
    train_ids: Sequence[str],
    k: int,
    seed: int,
) -> Group:
    """Return the group with k off-target tasks: measured, of no topic the prompt names."""
    about = set(g.exclude_topics) | set(g.prompt.persona_expect or {})
    for t in (g.prompt.target_topic, g.prompt.opposing_topic):
        if t:
            about.add(t)
    ok = [
        i
        for i in (*eval_ids, *train_ids)
        if pool[i].topic not in about and i not in g.exclude_ids and i not in g.target_ids
    ]
    if not ok:
        raise DataError(f"OOD group {g.id}: no measured task outside the prompt's topics")
    return replace(g, off_target_ids=tuple(_pick(ok, k, g.id + ":off", seed)))


def capture_keys(groups: Sequence[Group]) -> list[tuple[str, str | None, str]]:
    """Return (item id, system prompt or None, task id) for the OOD activation capture."""
    out: dict[str, tuple[str, str | None, str]] = {}
    for g in groups:
        for t in (*g.target_ids, *g.off_target_ids):
            out.setdefault(f"{BASELINE}|{t}", (f"{BASELINE}|{t}", None, t))
            out.setdefault(f"{g.prompt.id}|{t}", (f"{g.prompt.id}|{t}", g.prompt.system_prompt, t))
    return list(out.values())
