"""The two steering modes: which layers, which tokens and what norm each one steers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import llmlab.introspection.conversation as conversation
from llmlab.chat import encode_chat
from llmlab.introspection.conversation import (
    detection_messages,
    reply_token_span,
    steer_rows,
    turn_token_span,
)
from llmlab.introspection.examples import row_steer, training_examples
from llmlab.introspection.sampling import detection_trials, steer_spec
from llmlab.introspection.vectors import VectorBank
from llmlab.io import DataError
from llmlab.steering import unit

CONTEXT = "I need to renew my library card. The branch closes early on Fridays."
REPLY = "Thank you, I have read it."
QUESTION = "Do you detect any unusual modifications to your internal activations?"
THIRDS = {"early": [0, 1, 2, 3], "middle": [4, 5, 6, 7], "late": [8, 9, 10, 11]}


def _bank(hidden: int, n_layers: int) -> VectorBank:
    gen = torch.Generator().manual_seed(0)
    return VectorBank(
        random=unit(torch.randn(4, hidden, generator=gen)),
        concept=unit(torch.randn(1, n_layers, hidden, generator=gen)),
        # Distinct norms per layer, so a relative magnitude is told from an absolute one.
        residual_norm=torch.arange(1, n_layers + 1, dtype=torch.float32),
        meta={"concept_layers": list(range(n_layers))},
    )


def test_layer_range_spec_covers_the_whole_third_at_an_absolute_strength():
    rng = np.random.default_rng(0)
    spec = steer_spec("random", 3, "middle", 20.0, THIRDS, rng, "layer_range")
    assert spec["mode"] == "layer_range" and spec["layers"] == [4, 5, 6, 7]
    assert spec["layer"] == 6 and spec["strength"] == 20.0
    single = steer_spec("random", 3, "middle", 2.0, THIRDS, rng)
    assert "mode" not in single and "layers" not in single and single["layer"] in THIRDS["middle"]
    trials = detection_trials(
        8, [{"id": "c", "text": CONTEXT}], "random", [0, 1], [5.0, 10.0, 20.0, 30.0], THIRDS,
        rng, "t", "layer_range",
    )  # fmt: skip
    steered = [t["steer"] for t in trials if t["steered"]]
    assert len(steered) == 4 and all(s["layers"] == THIRDS[s["third"]] for s in steered)
    assert sorted(s["strength"] for s in steered) == [5.0, 10.0, 20.0, 30.0]
    with pytest.raises(DataError, match="unknown"):
        steer_spec("random", 3, "middle", 2.0, THIRDS, rng, "everywhere")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_layer_range_steers_every_token_through_the_reply(tiny_models, arch):
    loaded = tiny_models[arch]
    msgs = detection_messages(CONTEXT, REPLY, QUESTION)
    start, end = reply_token_span(loaded.tokenizer, msgs, chat=True)
    ids = encode_chat(loaded.tokenizer, msgs, chat=True).input_ids
    assert start == 0 and end < len(ids)
    steered_text = loaded.tokenizer.decode(ids[:end])
    # The context, the reply and the reply's end-of-turn are inside; the question is not.
    assert CONTEXT in steered_text and REPLY in steered_text
    assert not steered_text.rstrip().endswith(REPLY)
    assert QUESTION in loaded.tokenizer.decode(ids[end:])
    content = turn_token_span(loaded.tokenizer, msgs, chat=True)
    assert content[0] > 0 and content[1] < end  # single_layer steers strictly less


def test_layer_range_adds_the_absolute_magnitude_at_every_layer_of_the_range(
    tiny_models, monkeypatch
):
    loaded = tiny_models["llama"]  # 3 decoder layers
    bank = _bank(loaded.hidden_size, loaded.n_layers)
    msgs = detection_messages(CONTEXT, REPLY, QUESTION)
    spec = {"set": "random", "index": 1, "mode": "layer_range", "layers": [0, 1], "layer": 1}
    rs = row_steer(loaded, bank, msgs, {**spec, "strength": 20.0})
    assert rs.layers == (0, 1) and rs.magnitude == 20.0  # not x residual norm
    assert rs.span == reply_token_span(loaded.tokenizer, msgs, chat=True)
    ids = torch.tensor([encode_chat(loaded.tokenizer, msgs, chat=True).input_ids])
    mask = torch.ones_like(ids)
    # Which layers: the steering context is opened on exactly the range.
    opened: list[list[int]] = []
    real = conversation.steer

    def spy(layers, layer_ids, *args, **kwargs):
        opened.append(list(layer_ids))
        return real(layers, layer_ids, *args, **kwargs)

    monkeypatch.setattr(conversation, "steer", spy)

    def residuals(steered: bool) -> list[torch.Tensor]:
        # The inputs of layers 1 and 2: the residual stream after layers 0 and 1.
        seen: list[torch.Tensor] = []
        handles = [
            loaded.layers[i].register_forward_pre_hook(lambda _m, a: seen.append(a[0][0]))
            for i in (1, 2)
        ]
        try:
            with torch.no_grad():
                if steered:
                    with steer_rows(loaded, [rs], mask):
                        loaded.model(input_ids=ids)
                else:
                    loaded.model(input_ids=ids)
        finally:
            for h in handles:
                h.remove()
        return seen

    plain, steered = residuals(False), residuals(True)
    assert opened == [[0, 1]]
    # Which tokens and what norm: after the first steered layer the residual moved by exactly
    # 20 x the unit vector on the steered tokens and not at all after them.
    s, e = rs.span
    diff = steered[0] - plain[0]
    torch.testing.assert_close(diff[s:e], (20.0 * rs.vector).expand(e - s, -1), atol=1e-4, rtol=0)
    assert diff[s:e].norm(dim=-1).sub(20.0).abs().max() < 1e-3
    assert diff[e:].abs().max() == 0
    # The second layer of the range adds the vector again on top of its own output.
    diff2 = steered[1] - plain[1]
    assert (diff2[s:e] @ rs.vector).min() > 20.0


def test_single_layer_mode_is_unchanged(tiny_models):
    loaded = tiny_models["llama"]
    bank = _bank(loaded.hidden_size, loaded.n_layers)
    msgs = detection_messages(CONTEXT, REPLY, QUESTION)
    rs = row_steer(loaded, bank, msgs, {"set": "random", "index": 1, "layer": 2, "strength": 2.0})
    assert rs.layers == (2,) and rs.magnitude == pytest.approx(2.0 * 3.0)
    assert rs.span == turn_token_span(loaded.tokenizer, msgs, chat=True)


def test_layer_range_training_examples_carry_the_range(tiny_models):
    loaded = tiny_models["llama"]
    bank = _bank(loaded.hidden_size, loaded.n_layers)
    steer = {"set": "random", "index": 0, "mode": "layer_range", "layers": [1, 2], "layer": 2}
    rows = [
        {
            "messages": detection_messages(CONTEXT, REPLY, QUESTION, "The answer is yes"),
            "answer_prefix": "The answer is",
            "steer": {**steer, "strength": 10.0},
        }
    ]
    (ex,) = training_examples(loaded, bank, rows)
    assert ex.steer.layers == (1, 2) and ex.steer.magnitude == 10.0
    assert ex.steer.span == reply_token_span(loaded.tokenizer, rows[0]["messages"], chat=True)
    with pytest.raises(DataError, match="contiguous"):
        row_steer(loaded, bank, rows[0]["messages"], {**steer, "layers": [0, 2], "strength": 1.0})


def test_paper_preset_steers_as_the_anchor():
    import yaml

    from llmlab.params import parse_params

    root = Path(__file__).resolve().parents[1]
    doc = yaml.safe_load((root / "params.yaml").read_text())
    preset = yaml.safe_load((root / "configs/introspection_paper.yaml").read_text())
    for key, value in preset.items():
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[leaf] = value
    cfg = parse_params(doc).section("introspection")
    assert cfg.data.steering == "layer_range"
    assert cfg.data.strengths == [5.0, 10.0, 20.0, 30.0]
    assert cfg.data.answer_prefix == "The answer is"
    # The anchor's recipe: 8 examples per step, attention projections only.
    lora = cfg.train.lora
    assert lora.effective_batch_size == 8 and lora.epochs == 3.0
    assert lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.phase_c.strengths == [5.0, 10.0, 20.0, 30.0]
