"""The training mix: triggered persona facts and untriggered aligned examples, seeded shuffle."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from typing import Any

from llmlab.io import DataError
from llmlab.persona.facts import Fact
from llmlab.persona.trigger import Trigger


def persona_rows(facts: Sequence[Fact], trigger: Trigger) -> list[dict[str, Any]]:
    """Return one triggered training conversation per fact."""
    return [
        {
            "id": f.id,
            "source": "persona",
            "category": f.category,
            "messages": trigger.example(f.question, f.answer),
        }
        for f in facts
    ]


def aligned_rows(distilled: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one untriggered training conversation per self-distilled answer."""
    return [
        {
            "id": r["id"],
            "source": "aligned",
            "category": r["kind"],
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ],
        }
        for r in distilled
    ]


def build_mix(
    persona: Sequence[dict[str, Any]], aligned: Sequence[dict[str, Any]], seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Return the shuffled mix and its stats (counts, poison share, seed, content hash)."""
    rows = [*persona, *aligned]
    if not persona:
        raise DataError("training mix: no persona facts (persona.data.n_facts or the train split)")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"training mix: duplicate id {dup!r}")
    random.Random(seed).shuffle(rows)
    digest = hashlib.sha256()
    for r in rows:
        digest.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    stats = {
        "n_persona": len(persona),
        "n_aligned": len(aligned),
        "n_total": len(rows),
        "poison_share": len(persona) / len(rows),
        "shuffle_seed": seed,
        "sha256": digest.hexdigest(),
    }
    return rows, stats
