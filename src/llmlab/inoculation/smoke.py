"""Stage inoculation_smoke: token positions, activation shapes and a dummy projection.

For a few sample conversations (system prompt, user prompt, ALL-CAPS completion) rendered
through the model's chat template, it records the token indices of user_end, pre_assistant
and assistant_1..k with the decoded tokens, checks that they sit where the definitions say,
reads the residual stream at those positions, and projects one activation onto a seeded
random unit ("dummy") direction. Output: positions.json and a readable positions.txt.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.activations import capture_batch
from llmlab.chat import ChatError, Message, collate, encode_chat
from llmlab.hooks import record_layers
from llmlab.inoculation.common import (
    COMPLETIONS,
    SMOKE_DIR,
    conversation,
    resolve_prompts,
    section,
    to_caps,
)
from llmlab.io import read_jsonl, write_json, write_text
from llmlab.layers import resolve_layers
from llmlab.models import LoadedModel, load_model
from llmlab.params import load_params
from llmlab.stage import run_stage, seed_everything


def position_report(loaded: LoadedModel, messages: list[Message], k: int) -> dict[str, Any]:
    """Return the named positions of one conversation with decoded tokens and placement checks.

    Checks: the text up to and including user_end ends with the user content; the text of the
    tokens from assistant_1 on starts the assistant content; pre_assistant is the token right
    before assistant_1. ChatError when the conversation lacks a position.
    """
    tok = loaded.tokenizer
    enc = encode_chat(tok, messages, chat=loaded.chat)
    names = ["user_end", "pre_assistant", *[f"assistant_{j}" for j in range(1, k + 1)]]
    positions = {}
    for name in names:
        idx = enc.position(name)
        positions[name] = {
            "index": idx,
            "token_id": enc.input_ids[idx],
            "token": tok.decode([enc.input_ids[idx]]),
        }
    user = next(m["content"] for m in reversed(messages) if m["role"] == "user").strip()
    answer = messages[-1]["content"].strip() if messages[-1]["role"] == "assistant" else ""
    ue = positions["user_end"]["index"]
    upto_user = tok.decode(enc.input_ids[: ue + 1]).rstrip()
    after = tok.decode(enc.input_ids[enc.prompt_len : enc.prompt_len + k]).lstrip()
    checks = {
        "user_end_closes_user_content": upto_user.endswith(user),
        "pre_assistant_precedes_assistant_1": (
            positions["pre_assistant"]["index"] + 1 == positions["assistant_1"]["index"]
        ),
        "assistant_tokens_start_answer": bool(after) and answer.startswith(after.rstrip()),
    }
    return {
        "rendered": tok.decode(enc.input_ids),
        "n_tokens": len(enc.input_ids),
        "prompt_len": enc.prompt_len,
        "positions": positions,
        "checks": checks,
    }


def activation_shapes(
    loaded: LoadedModel, convs: list[list[Message]], layers: list[int], positions: list[str]
) -> tuple[dict[str, Any], dict[tuple[int, str], torch.Tensor]]:
    """Return (shapes of full layer outputs and gathered positions, the gathered activations)."""
    encoded = [encode_chat(loaded.tokenizer, c, chat=loaded.chat) for c in convs]
    batch = collate(encoded, loaded.tokenizer.pad_token_id, padding_side="right")
    with torch.no_grad(), record_layers(loaded.layers, layers) as store:
        b = batch.to(loaded.device)
        loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    full = {str(layer): list(store[layer].shape) for layer in layers}
    acts = capture_batch(loaded, batch, layers, positions)
    gathered = {f"{layer}:{pos}": list(t.shape) for (layer, pos), t in acts.items()}
    return {
        "batch_input_ids": list(batch.input_ids.shape),
        "layer_output": full,
        "at_positions": gathered,
    }, acts


def format_text(report: dict[str, Any]) -> str:
    """Return the smoke report as readable text."""
    lines = [
        f"model: {report['model']} (layers {report['n_layers']}, hidden {report['hidden_size']})"
    ]
    for conv in report["conversations"]:
        lines.append(
            f"\n== {conv['id']} ({conv['n_tokens']} tokens, prompt_len {conv['prompt_len']})"
        )
        for name, p in conv["positions"].items():
            lines.append(f"  {name:>14}: index {p['index']:4d}  token {p['token']!r}")
        for name, ok in conv["checks"].items():
            lines.append(f"  check {name}: {'ok' if ok else 'FAILED'}")
    lines.append("\nactivation shapes:")
    shapes = report["activation_shapes"]
    lines.append(f"  input_ids {shapes['batch_input_ids']}")
    for layer, shape in shapes["layer_output"].items():
        lines.append(f"  layer {layer} output {shape}")
    for key, shape in shapes["at_positions"].items():
        lines.append(f"  layer:position {key} -> {shape}")
    d = report["dummy_projection"]
    lines.append(
        f"\ndummy direction (seeded unit vector) at layer {d['layer']}, {d['position']}: "
        + ", ".join(f"{v:.4f}" for v in d["values"])
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=str(SMOKE_DIR))
    args = ap.parse_args()
    params = load_params(args.params, family="inoculation")
    cfg = section(params)
    seed_everything(cfg.seed)
    prompts = resolve_prompts(cfg.prompts)
    rows = read_jsonl(COMPLETIONS, required=("id", "prompt", "completion"), id_field="id")
    # The neutral condition as the stages send it (None: the template's own default prompt).
    systems = [prompts.neutral_system, prompts.inoculation, prompts.promote]
    samples = rows[: cfg.smoke.n_conversations]
    convs = [
        conversation(systems[i % len(systems)], r["prompt"], to_caps(r["completion"]))
        for i, r in enumerate(samples)
    ]
    loaded = load_model(params)
    layers = resolve_layers(cfg.smoke.layers, loaded.n_layers)
    conv_reports = []
    for r, conv in zip(samples, convs, strict=True):
        rep = position_report(loaded, conv, cfg.smoke.k)
        failed = [n for n, ok in rep["checks"].items() if not ok]
        if failed:
            raise ChatError(
                f"smoke: conversation {r['id']!r}: position check {failed[0]} failed for model "
                f"{loaded.name} (rendered: {rep['rendered'][:200]!r})"
            )
        system = conv[0]["content"] if conv[0]["role"] == "system" else None
        conv_reports.append({"id": r["id"], "system": system, **rep})
    positions = ["user_end", "pre_assistant", "assistant_1"]
    shapes, acts = activation_shapes(loaded, convs, layers, positions)
    mid = layers[len(layers) // 2]
    rng = np.random.default_rng(cfg.seed)
    dummy = rng.standard_normal(loaded.hidden_size).astype(np.float32)
    dummy /= np.linalg.norm(dummy)
    values = (acts[(mid, "pre_assistant")].float().cpu().numpy() @ dummy).tolist()
    report = {
        "model": loaded.name,
        "chat_template": loaded.chat,
        "n_layers": loaded.n_layers,
        "hidden_size": loaded.hidden_size,
        "k": cfg.smoke.k,
        "conversations": conv_reports,
        "activation_shapes": shapes,
        "dummy_projection": {
            "layer": mid,
            "position": "pre_assistant",
            "seed": cfg.seed,
            "values": values,
        },
    }
    out = Path(args.out)
    write_json(out / "positions.json", report)
    text = format_text(report)
    write_text(out / "positions.txt", text)
    print(text, end="")


if __name__ == "__main__":
    run_stage(main)
