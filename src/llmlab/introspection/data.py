"""Stage introspection_data: training sets of every variant and the evaluation trial sets.

Training sets (`datasets/<variant>/{train,val}.jsonl`) all have the same size. Detection sets
are half steered; the vague variant has the same rows as the original with the vague
questions; food-control rows are food / non-food snippets without steering; flipped-labels
rows are the original rows with `flip_fraction` of the labels swapped (seeded, stratified).
Evaluation sets (`eval_sets/*.jsonl`) use context prompts and snippets never seen in training.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.introspection.config import IntrospectionParams
from llmlab.introspection.sampling import (
    Row,
    cycle_sample,
    detection_trials,
    flip_labels,
    food_rows,
    localization_trials,
    split_pool,
    steer_spec,
    to_training_rows,
)
from llmlab.io import DataError, numbered, read_json, read_jsonl, write_json, write_jsonl


def load_contexts(path: Path) -> list[Row]:
    """Return the context prompts after checking their sentence fields."""
    rows = read_jsonl(path, required=("id", "text", "sentences"), id_field="id")
    for n, r in numbered(rows):
        if not isinstance(r["text"], str) or not r["text"].strip():
            raise DataError(f"{path}:{n}: text must be a non-empty string")
        sents = r["sentences"]
        if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            raise DataError(f"{path}:{n}: sentences must be a list of strings")
        if r.get("n_sentences") is not None and r["n_sentences"] != len(sents):
            raise DataError(f"{path}:{n}: n_sentences {r['n_sentences']} != {len(sents)} sentences")
    return rows


def load_snippets(path: Path) -> list[Row]:
    """Return the food / non-food snippets after checking the label field."""
    rows = read_jsonl(path, required=("id", "text", "is_food"), id_field="id")
    for n, r in numbered(rows):
        if not isinstance(r["is_food"], bool):
            raise DataError(f"{path}:{n}: is_food must be true or false, got {r['is_food']!r}")
    counts = Counter(r["is_food"] for r in rows)
    if counts[True] < 2 or counts[False] < 2:
        raise DataError(f"{path}: needs food and non-food snippets, got {dict(counts)}")
    return rows


def load_questions(path: Path) -> dict[str, list[str]]:
    """Return the detection question sets (original, vague, food)."""
    doc = read_json(path)
    for key in ("original", "vague", "food"):
        qs = doc.get(key) if isinstance(doc, dict) else None
        if not isinstance(qs, list) or not qs or not all(isinstance(q, str) and q for q in qs):
            raise DataError(f"{path}: '{key}' must be a non-empty list of questions")
    return {k: doc[k] for k in ("original", "vague", "food")}


def variant_datasets(
    cfg: IntrospectionParams,
    contexts: dict[str, list[Row]],
    snippets: dict[str, list[Row]],
    questions: dict[str, list[str]],
    vec_meta: dict[str, Any],
) -> dict[str, dict[str, list[Row]]]:
    """Return {variant: {"train": rows, "val": rows}} for every configured variant."""
    d = cfg.data
    thirds = vec_meta["thirds"]
    train_ids = list(range(*vec_meta["splits"]["train"]))
    base: dict[str, list[Row]] = {}
    for split, n, seed_offset in (("train", d.n_train, 0), ("val", d.n_val, 1)):
        rng = np.random.default_rng(d.seed + seed_offset)
        base[split] = detection_trials(
            n, contexts[split], "random", train_ids, d.strengths, thirds, rng, split, d.steering
        )
    out: dict[str, dict[str, list[Row]]] = {}
    for name, v in cfg.variants.items():
        out[name] = {}
        for split, n, seed_offset in (("train", d.n_train, 10), ("val", d.n_val, 11)):
            reply = d.context_reply
            if v.task == "food":
                rng = np.random.default_rng(d.seed + seed_offset)
                rows = food_rows(
                    n,
                    snippets[split],
                    questions[v.questions],
                    reply,
                    rng,
                    name,
                    split,
                    d.answer_prefix,
                )
            else:
                rows = to_training_rows(
                    base[split], questions[v.questions], reply, name, split, d.answer_prefix
                )
            if v.flip_labels:
                rows = flip_labels(rows, d.flip_fraction, d.seed + seed_offset)
            out[name][split] = rows
    return out


def eval_sets(
    cfg: IntrospectionParams,
    contexts: list[Row],
    snippets: list[Row],
    vec_meta: dict[str, Any],
    b6_questions: list[str],
) -> dict[str, list[Row]]:
    """Return the evaluation trial sets keyed by file stem."""
    d, e = cfg.data, cfg.eval
    thirds = vec_meta["thirds"]
    rng = np.random.default_rng(d.seed + 100)
    n1 = e.b1.n_per_set + (e.b1.n_per_set % 2)
    concept_ids = [c["index"] for c in vec_meta["concepts"]]
    sets: dict[str, list[Row]] = {
        "b1_in_distribution": detection_trials(
            n1,
            contexts,
            "random",
            list(range(*vec_meta["splits"]["train"])),
            d.strengths,
            thirds,
            rng,
            "b1_in_distribution",
            d.steering,
        ),
        "b1_heldout": detection_trials(
            n1,
            contexts,
            "random",
            list(range(*vec_meta["splits"]["heldout"])),
            d.strengths,
            thirds,
            rng,
            "b1_heldout",
            d.steering,
        ),
        "b1_concept": detection_trials(
            n1,
            contexts,
            "concept",
            concept_ids,
            d.strengths,
            thirds,
            rng,
            "b1_concept",
            d.steering,
        ),
    }
    words = {c["index"]: c["word"] for c in vec_meta["concepts"]}
    for r in sets["b1_concept"]:
        if r["steer"] is not None:
            r["steer"]["concept"] = words[r["steer"]["index"]]
    n_food = e.n_food_trials + (e.n_food_trials % 2)
    sets["food"] = [
        {
            "id": f"food_eval_{i:05d}",
            "context_id": r["context_id"],
            "context": r["messages"][0]["content"],
            "label": r["label"],
        }
        for i, r in enumerate(food_rows(n_food, snippets, ["-"], "-", rng, "food_eval", "eval"))
    ]
    b6 = e.b6
    if b6.n_concepts > len(vec_meta["concepts"]):
        raise DataError(
            f"eval.b6.n_concepts {b6.n_concepts} > {len(vec_meta['concepts'])} concept vectors"
        )
    chosen = balanced_concepts(vec_meta["concepts"], b6.n_concepts)
    ctx = cycle_sample(contexts, len(chosen) * len(b6_questions), rng)
    rows6: list[Row] = []
    k = 0
    for c in chosen:
        for qi, q in enumerate(b6_questions):
            spec = steer_spec("concept", c["index"], b6.third, b6.strength, thirds, rng, d.steering)
            rows6.append(
                {
                    "id": f"b6_{c['word']}_{qi}",
                    "concept": c["word"],
                    "kind": c.get("kind", ""),
                    "question_index": qi,
                    "question": q,
                    "context_id": ctx[k]["id"],
                    "context": ctx[k]["text"],
                    "steered": True,
                    "steer": {**spec, "concept": c["word"]},
                }
            )
            k += 1
    for qi, q in enumerate(b6_questions):
        c = contexts[qi % len(contexts)]
        rows6.append(
            {
                "id": f"b6_control_{qi}",
                "concept": None,
                "kind": "",
                "question_index": qi,
                "question": q,
                "context_id": c["id"],
                "context": c["text"],
                "steered": False,
                "steer": None,
            }
        )
    sets["b6"] = rows6
    sets["b7"] = localization_trials(
        e.b7.n_trials,
        contexts,
        list(range(*vec_meta["splits"]["train"])),
        e.b7.strengths,
        thirds,
        rng,
        "b7",
        d.steering,
    )
    return sets


def balanced_concepts(concepts: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Return n concepts taking the kinds (emotion, topic, persona) in turn, in file order."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for c in concepts:
        by_kind.setdefault(c.get("kind", ""), []).append(c)
    out: list[dict[str, Any]] = []
    while len(out) < n:
        for kind in list(by_kind):
            if by_kind[kind] and len(out) < n:
                out.append(by_kind[kind].pop(0))
    return out


def summarise(datasets: dict[str, dict[str, list[Row]]]) -> dict[str, Any]:
    """Return per-variant counts: rows, steered, yes labels, flipped labels."""
    out = {}
    for name, splits in datasets.items():
        out[name] = {
            split: {
                "n": len(rows),
                "steered": sum(r["steered"] for r in rows),
                "label_yes": sum(r["label"] == "yes" for r in rows),
                "label_flipped": sum(r["label_flipped"] for r in rows),
            }
            for split, rows in splits.items()
        }
    return out


def main() -> None:
    from llmlab.params import load_params

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/introspection")
    ap.add_argument("--vectors", default="data/introspection/vectors")
    ap.add_argument("--out", default="data/introspection/datasets")
    ap.add_argument("--eval-out", default="data/introspection/eval_sets")
    args = ap.parse_args()
    cfg: IntrospectionParams = load_params(args.params, family="introspection").section(
        "introspection"
    )
    src = Path(args.data)
    vec_meta = read_json(Path(args.vectors) / "vectors.json")
    contexts = load_contexts(src / "context_prompts.jsonl")
    snippets = load_snippets(src / "food_snippets.jsonl")
    questions = load_questions(src / "detection_questions.json")
    b6_doc = read_json(src / "b6_questions.json")
    b6_questions = b6_doc.get("questions") if isinstance(b6_doc, dict) else None
    if not isinstance(b6_questions, list) or not b6_questions:
        raise DataError(f"{src / 'b6_questions.json'}: 'questions' must be a non-empty list")
    d = cfg.data
    shares = {"val": d.val_context_share, "eval": d.eval_context_share}
    by_id = {r["id"]: r for r in contexts}
    ctx_split = {
        k: [by_id[i] for i in v]
        for k, v in split_pool([r["id"] for r in contexts], shares, d.seed).items()
    }
    snip_by_id = {r["id"]: r for r in snippets}
    snip_split: dict[str, list[Row]] = {"train": [], "val": [], "eval": []}
    for flag in (True, False):
        ids = [r["id"] for r in snippets if r["is_food"] is flag]
        for k, v in split_pool(ids, shares, d.seed).items():
            snip_split[k].extend(snip_by_id[i] for i in v)
    datasets = variant_datasets(cfg, ctx_split, snip_split, questions, vec_meta)
    out = Path(args.out)
    for name, splits in datasets.items():
        for split, rows in splits.items():
            write_jsonl(out / name / f"{split}.jsonl", rows)
    write_json(
        out / "summary.json",
        {
            "variants": summarise(datasets),
            "context_pools": {k: len(v) for k, v in ctx_split.items()},
            "snippet_pools": {k: len(v) for k, v in snip_split.items()},
        },
    )
    sets = eval_sets(cfg, ctx_split["eval"], snip_split["eval"], vec_meta, b6_questions)
    for name, rows in sets.items():
        write_jsonl(Path(args.eval_out) / f"{name}.jsonl", rows)


if __name__ == "__main__":
    from llmlab.stage import run_stage

    run_stage(main, gpus=0)
