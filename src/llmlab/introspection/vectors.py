"""Stage introspection_vectors: random and concept steering vectors with residual norms.

Writes `vectors.safetensors` (random [n, hidden], concept [n_concepts, n_span_layers, hidden],
residual_norm [n_layers]) and `vectors.json` (splits, concept words, layer thirds, norms).
Every vector is unit length; a steering magnitude is `strength * residual_norm[layer]`, so
strengths are in units of the typical residual-token norm at the injection layer.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.activations import capture_batch
from llmlab.chat import collate, encode_chat
from llmlab.hooks import record_layers
from llmlab.introspection.config import VectorsConfig
from llmlab.io import DataError, read_json
from llmlab.layers import resolve_layers
from llmlab.models import LoadedModel
from llmlab.steering import SteeringError, unit

VECTORS_FILE = "vectors.safetensors"
META_FILE = "vectors.json"
VECTORS_KIND = "llmlab.introspection.vectors"
THIRDS = ("early", "middle", "late")


def layer_thirds(first: int, last: int) -> dict[str, list[int]]:
    """Return the early/middle/late thirds of the inclusive layer span [first, last]."""
    if last - first + 1 < 3:
        raise DataError(f"layer span {first}..{last} has fewer than 3 layers; cannot cut thirds")
    parts = np.array_split(np.arange(first, last + 1), 3)
    return {name: [int(x) for x in part] for name, part in zip(THIRDS, parts, strict=True)}


def random_unit_vectors(n: int, hidden: int, seed: int) -> torch.Tensor:
    """Return n seeded Gaussian directions of width `hidden`, each scaled to unit length."""
    gen = torch.Generator().manual_seed(seed)
    return unit(torch.randn(n, hidden, generator=gen))


@torch.no_grad()
def residual_norms(loaded: LoadedModel, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """Return the median per-token residual norm at every layer over the user prompts `texts`.

    The first token of each row is left out: attention-sink tokens carry norms far above the
    typical token and would dominate the scale.
    """
    layers = list(range(loaded.n_layers))
    per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
    encoded = [
        encode_chat(loaded.tokenizer, [{"role": "user", "content": t}], chat=loaded.chat)
        for t in texts
    ]
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], loaded.tokenizer.pad_token_id, "right")
        batch = batch.to(loaded.device)
        with record_layers(loaded.layers, layers) as store:
            loaded.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            )
        keep = batch.attention_mask.bool().clone()
        keep[:, 0] = False
        for i in layers:
            per_layer[i].append(store[i].float().norm(dim=-1)[keep].cpu())
    return torch.stack([torch.cat(v).median() for v in per_layer])


def concept_vectors(
    loaded: LoadedModel,
    words: Sequence[str],
    baseline_words: Sequence[str],
    template: str,
    layers: Sequence[int],
    position: str,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (unit concept vectors [n_words, n_layers, hidden], raw norms [n_words, n_layers]).

    A concept vector is the activation for template.format(word=w) minus the mean activation
    over the baseline words, at each listed layer.
    """
    if "{word}" not in template:
        raise DataError(f"vectors.concept_template {template!r} has no {{word}} placeholder")

    def acts(items: Sequence[str]) -> torch.Tensor:
        rows = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            enc = [
                encode_chat(
                    loaded.tokenizer,
                    [{"role": "user", "content": template.format(word=w)}],
                    chat=loaded.chat,
                )
                for w in chunk
            ]
            batch = collate(enc, loaded.tokenizer.pad_token_id, "right")
            out = capture_batch(loaded, batch, layers, [position])
            rows.append(torch.stack([out[(lay, position)].float().cpu() for lay in layers], 1))
        return torch.cat(rows)

    diff = acts(words) - acts(baseline_words).mean(dim=0, keepdim=True)
    norms = diff.norm(dim=-1)
    return unit(diff), norms


@dataclass
class VectorBank:
    """The saved vectors with their metadata, checked against a model."""

    random: torch.Tensor
    concept: torch.Tensor
    residual_norm: torch.Tensor
    meta: dict[str, Any]

    @property
    def thirds(self) -> dict[str, list[int]]:
        """Return the injection layers of each third."""
        return self.meta["thirds"]

    def index_range(self, split: str) -> range:
        """Return the random-vector indices of a split ('train' or 'heldout')."""
        lo, hi = self.meta["splits"][split]
        return range(lo, hi)

    def vector(self, vector_set: str, index: int, layer: int) -> torch.Tensor:
        """Return the unit vector of a set ('random' or 'concept') for an injection layer."""
        if vector_set == "random":
            if not 0 <= index < self.random.shape[0]:
                raise DataError(
                    f"random vector index {index} out of range 0..{self.random.shape[0] - 1}"
                )
            return self.random[index]
        if vector_set == "concept":
            layers = self.meta["concept_layers"]
            if layer not in layers:
                raise DataError(
                    f"no concept vector at layer {layer} (have {layers[0]}..{layers[-1]})"
                )
            if not 0 <= index < self.concept.shape[0]:
                raise DataError(
                    f"concept index {index} out of range 0..{self.concept.shape[0] - 1}"
                )
            return self.concept[index, layers.index(layer)]
        raise DataError(f"unknown vector set {vector_set!r} (known: random, concept)")

    def magnitude(self, strength: float, layer: int) -> float:
        """Return the absolute steering magnitude of a strength at a layer."""
        if strength <= 0:
            raise DataError(f"steering strength must be > 0, got {strength}")
        return float(strength) * float(self.residual_norm[layer])


def save_vectors(out_dir: Path, bank: VectorBank) -> None:
    """Write the tensors (safetensors) and the metadata (JSON sidecar) atomically."""
    from llmlab.tensorfile import save_tensors

    tensors = {
        "random": bank.random,
        "concept": bank.concept,
        "residual_norm": bank.residual_norm,
    }
    save_tensors(
        out_dir / VECTORS_FILE, tensors, bank.meta, kind=VECTORS_KIND, meta_path=out_dir / META_FILE
    )


def load_vectors(vec_dir: str | Path, loaded: LoadedModel | None = None) -> VectorBank:
    """Return the saved vectors; a width or depth that does not match `loaded` is an error."""
    from llmlab.tensorfile import load_tensors

    d = Path(vec_dir)
    path = d / VECTORS_FILE
    if not path.is_file():
        raise DataError(f"{path}: file not found (run the introspection_vectors stage)")
    arrays, meta = load_tensors(
        path,
        kind=VECTORS_KIND,
        required=("random", "concept", "residual_norm"),
        meta_path=d / META_FILE,
    )
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    bank = VectorBank(tensors["random"], tensors["concept"], tensors["residual_norm"], meta)
    width = bank.random.shape[-1]
    if bank.concept.shape[-1] != width:
        raise DataError(f"{path}: concept width {bank.concept.shape[-1]} != random width {width}")
    if loaded is not None:
        if width != loaded.hidden_size:
            raise SteeringError(
                f"{path}: vector width {width} does not match model {loaded.name} "
                f"(hidden size {loaded.hidden_size}); re-run introspection_vectors"
            )
        if bank.residual_norm.shape[0] != loaded.n_layers:
            raise SteeringError(
                f"{path}: norms cover {bank.residual_norm.shape[0]} layers, model {loaded.name} "
                f"has {loaded.n_layers}"
            )
    return bank


def build_vectors(
    loaded: LoadedModel, cfg: VectorsConfig, concepts_doc: dict[str, Any], context_texts: list[str]
) -> VectorBank:
    """Return the vector bank of a model: random splits, concept vectors, residual norms."""
    span = resolve_layers(cfg.span_layers, loaded.n_layers)
    first, last = (span[0], span[-1]) if len(span) > 1 else (span[0], span[0])
    thirds = layer_thirds(first, last)
    concepts = concepts_doc.get("concepts")
    baseline = concepts_doc.get("baseline_words")
    if not isinstance(concepts, list) or not concepts:
        raise DataError("concepts.json: 'concepts' must be a non-empty list")
    if not isinstance(baseline, list) or len(baseline) < 2:
        raise DataError("concepts.json: 'baseline_words' must list at least 2 words")
    for i, c in enumerate(concepts):
        if not isinstance(c, dict) or not isinstance(c.get("word"), str):
            raise DataError(f"concepts.json: concepts[{i}] needs a 'word' string")
    chosen = concepts[: cfg.n_concepts] if cfg.n_concepts else concepts
    if len(chosen) < 20:
        raise DataError(f"concepts.json: {len(chosen)} concepts; the protocol needs at least 20")
    n_random = cfg.n_train_vectors + cfg.n_heldout_vectors
    random = random_unit_vectors(n_random, loaded.hidden_size, cfg.seed)
    layers = list(range(first, last + 1))
    concept, raw_norms = concept_vectors(
        loaded,
        [c["word"] for c in chosen],
        baseline,
        cfg.concept_template,
        layers,
        cfg.concept_position,
        cfg.batch_size,
    )
    norms = residual_norms(loaded, context_texts[: cfg.n_norm_prompts], cfg.batch_size)
    meta = {
        "model": loaded.name,
        "hidden_size": loaded.hidden_size,
        "n_layers": loaded.n_layers,
        "seed": cfg.seed,
        "splits": {
            "train": [0, cfg.n_train_vectors],
            "heldout": [cfg.n_train_vectors, n_random],
        },
        "thirds": thirds,
        "concept_layers": layers,
        "concepts": [
            {"word": c["word"], "kind": c.get("kind", ""), "index": i} for i, c in enumerate(chosen)
        ],
        "concept_template": cfg.concept_template,
        "concept_position": cfg.concept_position,
        "n_baseline_words": len(baseline),
        "concept_raw_norm_over_residual": {
            c["word"]: [
                round(float(raw_norms[i, j] / norms[lay]), 4) for j, lay in enumerate(layers)
            ]
            for i, c in enumerate(chosen)
        },
        "residual_norm": [round(float(x), 4) for x in norms],
        "residual_norm_rule": "median per-token L2 norm of the residual stream after each "
        "decoder block, first token excluded, over the first n_norm_prompts context prompts",
        "magnitude_rule": "magnitude = strength * residual_norm[layer]; vectors are unit length",
    }
    return VectorBank(random, concept, norms, meta)


def main() -> None:
    from llmlab.io import read_jsonl
    from llmlab.models import load_model
    from llmlab.params import load_params
    from llmlab.stage import seed_everything

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/introspection")
    ap.add_argument("--out", default="data/introspection/vectors")
    args = ap.parse_args()
    params = load_params(args.params, family="introspection")
    cfg = params.section("introspection").vectors
    seed_everything(cfg.seed)
    data = Path(args.data)
    concepts_doc = read_json(
        data / "concepts.json", required={"concepts": list, "baseline_words": list}
    )
    contexts = read_jsonl(data / "context_prompts.jsonl", required=("id", "text"), id_field="id")
    loaded = load_model(params)
    bank = build_vectors(loaded, cfg, concepts_doc, [r["text"] for r in contexts])
    save_vectors(Path(args.out), bank)


if __name__ == "__main__":
    from llmlab.stage import run_stage

    run_stage(main)
