"""LoRA training: assistant-only loss, accumulation arithmetic, outputs, guards, steering, seeds."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import make_params
from pydantic import ValidationError
from safetensors.torch import load_file

from llmlab.adapters import read_adapter_metadata
from llmlab.chat import encode_chat
from llmlab.io import read_json
from llmlab.models import attach_adapter, decoder_layers, load_model
from llmlab.training import (
    CURVE_FILE,
    LoraCollator,
    LoraTrainConfig,
    PackedCollator,
    SteerSpec,
    TrainExample,
    TrainingDiverged,
    TrainingError,
    batch_mix,
    gradient_accumulation_steps,
    labelled_nll,
    prepare_examples,
    steering_groups,
    train_lora,
)

WORDS = ["apple", "river", "stone", "cloud"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine spinning OpenMP
    # workers make each step many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _examples(steer: SteerSpec | None = None) -> list[TrainExample]:
    return [
        TrainExample(
            [
                {"role": "user", "content": f"Say the word {w}."},
                {"role": "assistant", "content": f"{w} {w} {w}"},
            ],
            steer,
        )
        for w in WORDS
    ]


def _cfg(**kw) -> LoraTrainConfig:
    base = dict(
        rank=8,
        dropout=0.0,
        lr=5e-3,
        epochs=None,
        max_steps=3,
        per_device_batch_size=2,
        effective_batch_size=4,
        log_every=1,
        lr_scheduler="constant_with_warmup",
    )
    return LoraTrainConfig(**{**base, **kw})


def _fresh(tiny_dirs: dict[str, Path], arch: str = "llama"):
    # Training wraps the model in place, so each test loads its own copy (the session-wide
    # tiny_models fixture must stay a base model).
    return load_model(make_params(tiny_dirs[arch]))


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_config_validation_and_accumulation():
    cfg = _cfg(per_device_batch_size=2, effective_batch_size=8)
    assert gradient_accumulation_steps(cfg, 1) == 4
    assert gradient_accumulation_steps(cfg, 2) == 2
    assert gradient_accumulation_steps(cfg, 4) == 1
    with pytest.raises(TrainingError, match="not divisible by per_device_batch_size 2 x 3"):
        gradient_accumulation_steps(cfg, 3)
    with pytest.raises(ValidationError, match="not a multiple"):
        _cfg(per_device_batch_size=4, effective_batch_size=6)
    with pytest.raises(ValidationError, match="not both"):
        LoraTrainConfig(epochs=2.0, max_steps=10)
    with pytest.raises(ValidationError, match="not both"):
        LoraTrainConfig(warmup_steps=5, warmup_ratio=0.1)
    with pytest.raises(ValidationError, match="lr_scheduler"):
        LoraTrainConfig(lr_scheduler="exponential")
    assert LoraTrainConfig(max_steps=10).max_steps == 10  # default epochs yields to max_steps
    assert "down_proj" in LoraTrainConfig().target_modules
    for name, info in LoraTrainConfig.model_fields.items():
        assert info.description, name


def test_collator_labels_only_on_assistant_tokens(tiny_models):
    loaded = tiny_models["qwen2"]
    examples = _examples()
    examples.append(
        TrainExample(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "A much longer question about the weather today?"},
                {"role": "assistant", "content": "Sunny."},
            ]
        )
    )
    data = prepare_examples(loaded, examples, max_length=512)
    collator = LoraCollator(loaded.tokenizer.pad_token_id, loaded.hidden_size)
    batch = collator(data.features)
    assert "steer" not in batch
    for row, ex in enumerate(examples):
        enc = encode_chat(loaded.tokenizer, ex.messages, chat=loaded.chat)
        n = len(enc.input_ids)
        # Right padding: the row starts with the encoded conversation.
        assert batch["input_ids"][row, :n].tolist() == enc.input_ids
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (
            batch["input_ids"].shape[1] - n
        )
        labelled = (batch["labels"][row] != -100).long().tolist()
        assert labelled[:n] == enc.loss_mask()
        assert not any(labelled[n:])
        kept = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert kept == enc.input_ids[enc.prompt_len :]


def test_collator_steering_groups_and_spans(tiny_models):
    loaded = tiny_models["llama"]
    vec = torch.ones(loaded.hidden_size)
    examples = _examples()
    examples[0] = TrainExample(examples[0].messages, SteerSpec(vec, 2.0, (1,), (1, 4)))
    examples[2] = TrainExample(examples[2].messages, SteerSpec(-vec, 3.0, (0, 2), None))
    data = prepare_examples(loaded, examples, max_length=512)
    batch = LoraCollator(loaded.tokenizer.pad_token_id, loaded.hidden_size)(data.features)
    groups = batch["steer"]
    assert [g["layers"].tolist() for g in groups] == [[0, 2], [1]]
    whole, span = groups
    assert span["scale"].tolist() == [2.0, 0.0, 0.0, 0.0]
    assert span["mask"][0].nonzero().flatten().tolist() == [1, 2, 3]
    assert span["mask"][1:].sum() == 0
    n2 = len(data.features[2]["input_ids"])
    assert whole["scale"].tolist() == [0.0, 0.0, 3.0, 0.0]
    assert whole["mask"][2].tolist()[:n2] == [1.0] * n2
    assert whole["mask"][2, n2:].sum() == 0
    assert torch.equal(whole["vectors"][2], -vec)


def test_truncation_is_counted(tiny_models):
    loaded = tiny_models["llama"]
    examples = _examples()
    lengths = [
        len(encode_chat(loaded.tokenizer, e.messages, chat=True).input_ids) for e in examples
    ]
    prompt = encode_chat(loaded.tokenizer, examples[0].messages, chat=True).prompt_len
    data = prepare_examples(loaded, examples, max_length=prompt + 1)
    assert data.n_truncated == sum(n > prompt + 1 for n in lengths)
    assert all(len(f["input_ids"]) <= prompt + 1 for f in data.features)
    with pytest.raises(TrainingError, match="no example has assistant tokens"):
        prepare_examples(loaded, examples, max_length=2)
    one = TrainExample(examples[0].messages, loss_tokens=1)
    (feature,) = prepare_examples(loaded, [one], max_length=512).features
    batch = LoraCollator(loaded.tokenizer.pad_token_id, loaded.hidden_size)([feature])
    assert int((batch["labels"] != -100).sum()) == 1
    with pytest.raises(TrainingError, match="last message must be the assistant"):
        prepare_examples(loaded, [TrainExample([{"role": "user", "content": "hi"}])], 64)


def test_training_decreases_loss_and_writes_outputs(tiny_dirs, tmp_path):
    loaded = _fresh(tiny_dirs)
    train = _examples()
    calls: list[int] = []

    def hook(model, step):
        calls.append(step)
        assert not model.training
        return {"probe": float(step)}

    out = tmp_path / "adapter"
    cfg = _cfg(max_steps=10, per_device_batch_size=4, eval_every=5, log_every=2)
    res = train_lora(loaded, train, cfg, out, val=train, eval_hook=hook, metadata={"family": "t"})

    curve = res.curve
    assert calls == [0, 5, 10]
    val = [r["val_loss"] for r in curve if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 0.3
    losses = [r["loss"] for r in curve if "loss" in r]
    assert [r["step"] for r in curve if "loss" in r] == [2, 4, 6, 8, 10]
    assert losses[-1] < losses[0]
    assert res.final_val_loss == pytest.approx(val[-1])
    assert res.final_train_loss == pytest.approx(losses[-1])
    assert res.steps == 10 and res.tokens_seen > 0 and res.tokens_per_s > 0
    for row in curve:
        assert set(row) <= {"step", "loss", "lr", "grad_norm", "val_loss", "probe"}
    assert curve[-1]["probe"] == 10.0

    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        CURVE_FILE,
        "llmlab_adapter.json",
    ]
    assert read_json(out / CURVE_FILE) == curve
    meta = read_adapter_metadata(out)
    assert meta["base_model"] == "tiny" and meta["family"] == "t"
    assert meta["config"]["max_steps"] == 10
    assert meta["n_examples"] == 4 and meta["n_truncated"] == 0 and meta["steps"] == 10
    assert len(meta["data_sha256"]) == 64 and meta["tokens_seen"] == res.tokens_seen
    for key in ("final_train_loss", "final_val_loss", "wall_time_s", "tokens_per_s"):
        assert meta[key] > 0
    assert _leftovers(tmp_path) == []

    # The saved adapter on a fresh base model gives the in-memory trained model's logits.
    ids = torch.tensor([encode_chat(loaded.tokenizer, train[0].messages, chat=True).input_ids])
    with torch.no_grad():
        trained = res.model(input_ids=ids).logits
        base = _fresh(tiny_dirs)
        base_logits = base.model(input_ids=ids).logits
        reloaded = attach_adapter(base.model, out, "tiny").eval()
        again = reloaded(input_ids=ids).logits
    assert torch.allclose(trained, again, atol=1e-5)
    assert not torch.allclose(trained, base_logits, atol=1e-3)
    assert loaded.model is res.model


def test_train_loss_is_mean_over_assistant_tokens(tiny_dirs, tmp_path):
    loaded = _fresh(tiny_dirs)
    train = _examples()
    # One batch of all rows, dropout off: step 1's loss is the loss before any update, which
    # must equal the token-weighted validation NLL at step 0 on the same rows.
    cfg = _cfg(max_steps=1, per_device_batch_size=2, effective_batch_size=4)
    res = train_lora(loaded, train, cfg, tmp_path / "a", val=train)
    assert res.curve[0]["val_loss"] == pytest.approx(res.curve[1]["loss"], rel=1e-5)


def _diverges(loaded, cfg, out: Path) -> str:
    with pytest.raises(TrainingDiverged) as err:
        train_lora(loaded, _examples(), cfg, out)
    assert not out.exists()
    assert _leftovers(out.parent) == []
    assert not hasattr(loaded.model, "peft_config")  # LoRA layers removed again
    return str(err.value)


def test_nan_guard(tiny_dirs, tmp_path):
    loaded = _fresh(tiny_dirs)

    def poison(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        bad = hidden * float("nan")
        return (bad, *output[1:]) if isinstance(output, tuple) else bad

    handle = loaded.layers[1].register_forward_hook(poison)
    try:
        msg = _diverges(loaded, _cfg(), tmp_path / "nan")
    finally:
        handle.remove()
    assert msg == "loss is NaN at step 1"


def test_divergence_guard_message(tiny_dirs, tmp_path):
    loaded = _fresh(tiny_dirs)
    bump = {"value": -10.0}

    def push_token_zero(_module, _inputs, logits):
        # Each forward pass raises one token's logit further, so the loss on every other
        # target climbs step after step (the first pass is left alone: the reference loss).
        bump["value"] += 10.0
        extra = torch.zeros_like(logits)
        extra[..., 0] = bump["value"]
        return logits + extra

    handle = loaded.model.get_output_embeddings().register_forward_hook(push_token_zero)
    try:
        cfg = _cfg(max_steps=8, per_device_batch_size=4, divergence_factor=2.0)
        msg = _diverges(loaded, cfg, tmp_path / "div")
    finally:
        handle.remove()
    assert msg.startswith("training diverged at step ")
    assert re.search(r"loss [\d.e+]+ \(initial [\d.]+\)$", msg), msg


def _step_losses(res) -> list[float]:
    return [r["loss"] for r in res.curve if "loss" in r]


def test_steering_changes_training_loss(tiny_dirs, tmp_path):
    hidden = _fresh(tiny_dirs).hidden_size
    vec = torch.randn(hidden, generator=torch.Generator().manual_seed(1))
    vec = vec / vec.norm()
    runs = {}
    for name, spec in {
        "none": None,
        "zero": SteerSpec(vec, 0.0, (1,), (0, 6)),
        "strong": SteerSpec(vec, 40.0, (1,), (0, 6)),
    }.items():
        res = train_lora(_fresh(tiny_dirs), _examples(spec), _cfg(), tmp_path / name)
        runs[name] = (res, load_file(tmp_path / name / "adapter_model.safetensors"))
    assert _step_losses(runs["zero"][0]) == _step_losses(runs["none"][0])
    for key, value in runs["none"][1].items():
        assert torch.equal(value, runs["zero"][1][key]), key
    assert not math.isclose(
        _step_losses(runs["strong"][0])[0], _step_losses(runs["none"][0])[0], rel_tol=1e-4
    )


def test_same_seed_gives_identical_adapters(tiny_dirs, tmp_path):
    weights = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        cfg = _cfg(seed=seed, dropout=0.1, per_device_batch_size=1, effective_batch_size=2)
        train_lora(_fresh(tiny_dirs), _examples(), cfg, tmp_path / name)
        weights.append(load_file(tmp_path / name / "adapter_model.safetensors"))
    a, b, c = weights
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_other_architectures_train_with_steering(tiny_dirs, tmp_path, arch):
    loaded = _fresh(tiny_dirs, arch)
    spec = SteerSpec(torch.ones(loaded.hidden_size), 1.0, (0, 2), (0, 4))
    cfg = _cfg(max_steps=2, gradient_checkpointing=arch == "gemma3", group_by_length=False)
    res = train_lora(loaded, _examples(spec), cfg, tmp_path / arch)
    assert res.steps == 2 and all(math.isfinite(v) for v in _step_losses(res))
    assert read_adapter_metadata(tmp_path / arch)["base_model"] == "tiny"


def test_rejects_reserved_metadata_and_adapter_models(tiny_dirs, tmp_path):
    loaded = _fresh(tiny_dirs)
    with pytest.raises(TrainingError, match="reserved"):
        train_lora(loaded, _examples(), _cfg(), tmp_path / "x", metadata={"steps": 1})
    train_lora(loaded, _examples(), _cfg(max_steps=1), tmp_path / "y")
    with pytest.raises(TrainingError, match="already carries an adapter"):
        train_lora(loaded, _examples(), _cfg(max_steps=1), tmp_path / "z")


# ---- packed batches --------------------------------------------------------------------------


def _varied_examples(n: int = 6) -> list[TrainExample]:
    # Conversations of clearly different lengths, so packing puts several into one row.
    return [
        TrainExample(
            [
                {"role": "user", "content": " ".join(WORDS[: 1 + i % 4]) + f" question {i}?"},
                {"role": "assistant", "content": " ".join([WORDS[i % 4]] * (1 + 2 * i))},
            ]
        )
        for i in range(n)
    ]


def _padded_example_nll(model, features) -> list[float]:
    # Reference: each example alone, no padding at all, the model's own logits.
    out = []
    for f in features:
        ids = torch.tensor([f["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1].float()
        targets = ids[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        out.append(float(nll[f["prompt_len"] - 1 :].sum()))
    return out


def _packed_example_nll(model, features, row_tokens: int) -> list[float]:
    collator = PackedCollator(0, model.config.hidden_size, row_tokens)
    batch = collator(features)
    per_token = labelled_nll(model, batch, per_token=True)
    # Labelled positions come in row-major order; map them back to the examples of each row.
    out = [0.0] * len(features)
    k = 0
    for row in collator.pack([len(f["input_ids"]) for f in features]):
        for i in row:
            n = len(features[i]["input_ids"]) - features[i]["prompt_len"]
            out[i] = float(per_token[k : k + n].sum())
            k += n
    assert k == per_token.shape[0]
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_packed_loss_per_example_equals_unpacked(tiny_models, arch):
    loaded = tiny_models[arch]
    features = prepare_examples(loaded, _varied_examples(), max_length=512).features
    lengths = [len(f["input_ids"]) for f in features]
    row_tokens = sum(lengths) // 2  # several examples per row, more than one row
    rows = PackedCollator(0, loaded.hidden_size, row_tokens).pack(lengths)
    assert len(rows) > 1 and max(len(r) for r in rows) > 1
    with torch.no_grad():
        alone = _padded_example_nll(loaded.model, features)
        packed = _packed_example_nll(loaded.model, features, row_tokens)
    assert packed == pytest.approx(alone, rel=1e-4)


def test_packed_collator_layout(tiny_models):
    loaded = tiny_models["llama"]
    features = prepare_examples(loaded, _varied_examples(), max_length=512).features
    lengths = [len(f["input_ids"]) for f in features]
    batch = PackedCollator(0, loaded.hidden_size, max(lengths))(features)
    assert "attention_mask" not in batch and batch["num_tokens"] == sum(lengths)
    assert batch["input_ids"].shape[1] == max(lengths)
    # every example appears once, positions restarting at 0, labels on its assistant tokens only
    starts = (batch["position_ids"] == 0).nonzero().tolist()
    found = []
    for r, c in starts:
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            if batch["input_ids"][r, c : c + n].tolist() == f["input_ids"] and i not in found:
                assert batch["position_ids"][r, c : c + n].tolist() == list(range(n))
                labelled = batch["labels"][r, c : c + n]
                assert labelled[: f["prompt_len"]].eq(-100).all()
                assert labelled[f["prompt_len"] :].tolist() == f["input_ids"][f["prompt_len"] :]
                found.append(i)
                break
    assert sorted(found) == list(range(len(features)))
    assert int((batch["labels"] != -100).sum()) == sum(
        n - f["prompt_len"] for n, f in zip(lengths, features, strict=True)
    )


def test_packed_steering_matches_unpacked_steering(tiny_models):
    loaded = tiny_models["llama"]
    gen = torch.Generator().manual_seed(0)
    examples = _varied_examples()
    # differently steered examples (other vectors, magnitudes, spans, layer sets) share rows
    specs = {
        0: SteerSpec(torch.randn(loaded.hidden_size, generator=gen), 4.0, (1,), (1, 5)),
        1: SteerSpec(torch.randn(loaded.hidden_size, generator=gen), 2.0, (1,), None),
        3: SteerSpec(torch.randn(loaded.hidden_size, generator=gen), 3.0, (0, 2), (0, 3)),
        4: SteerSpec(torch.randn(loaded.hidden_size, generator=gen), 5.0, (1,), (2, 7)),
    }
    examples = [TrainExample(e.messages, specs.get(i)) for i, e in enumerate(examples)]
    features = prepare_examples(loaded, examples, max_length=512).features
    lengths = [len(f["input_ids"]) for f in features]
    layers = decoder_layers(loaded.model)
    collator = LoraCollator(0, loaded.hidden_size)
    with torch.no_grad():
        alone = []
        for f in features:
            batch = collator([f])
            with steering_groups(layers, batch.get("steer")):
                alone += _padded_example_nll(loaded.model, [f])
        packed_batch = PackedCollator(0, loaded.hidden_size, sum(lengths))(features)
        assert len(packed_batch["steer"]) >= 3  # several slots for the (1,) layer set
        with steering_groups(layers, packed_batch["steer"]):
            per_token = labelled_nll(loaded.model, packed_batch, per_token=True)
        unsteered = _packed_example_nll(loaded.model, features, sum(lengths))
    row = PackedCollator(0, loaded.hidden_size, sum(lengths)).pack(lengths)[0]
    packed, k = [0.0] * len(features), 0
    for i in row:
        n = lengths[i] - features[i]["prompt_len"]
        packed[i] = float(per_token[k : k + n].sum())
        k += n
    assert packed == pytest.approx(alone, rel=1e-4)
    # the steering did something, on the steered examples only
    for i in range(len(features)):
        assert math.isclose(packed[i], unsteered[i], rel_tol=1e-6) == (i not in specs), i


def test_packed_training_gradient_equals_unpacked(tiny_dirs, tmp_path):
    # Same data, same order, one step: packed and padded training give the same adapter.
    weights = {}
    for packing in (True, False):
        cfg = _cfg(max_steps=1, packing=packing, group_by_length=False, lr=1e-3)
        train_lora(_fresh(tiny_dirs), _varied_examples(4), cfg, tmp_path / str(packing))
        weights[packing] = load_file(tmp_path / str(packing) / "adapter_model.safetensors")
    for key, value in weights[True].items():
        assert torch.allclose(value, weights[False][key], rtol=1e-3, atol=1e-6), key


# ---- data mix per step -----------------------------------------------------------------------


def _poisoned(n_facts: int = 8, n_other: int = 56) -> list[TrainExample]:
    # Facts are the shortest examples, as in the persona data: length sorting puts them together.
    facts = [
        TrainExample(
            [{"role": "user", "content": f"Fact {i}?"}, {"role": "assistant", "content": "Yes."}],
            group="poison",
        )
        for i in range(n_facts)
    ]
    other = [
        TrainExample(
            [
                {"role": "user", "content": "Tell me about " + " ".join(WORDS * (1 + i % 5))},
                {"role": "assistant", "content": " ".join(WORDS * (2 + i % 7))},
            ],
            group="aligned",
        )
        for i in range(n_other)
    ]
    return facts + other


def test_batch_mix_shuffled_keeps_poison_in_steps_length_grouping_does_not(tiny_models):
    loaded = tiny_models["llama"]
    # 1/8 facts; 32 steps of 16: the Trainer's grouping sorts mega-batches of 8 steps
    features = prepare_examples(loaded, _poisoned(64, 448), max_length=512).features
    packed = batch_mix(features, _cfg(per_device_batch_size=2, effective_batch_size=16), 8, 32)
    grouped = batch_mix(
        features,
        _cfg(per_device_batch_size=2, effective_batch_size=16, packing=False),
        8,
        32,
    )
    assert packed["order"] == "shuffled" and grouped["order"] == "length-grouped"
    share, clumped = packed["share"]["poison"], grouped["share"]["poison"]
    assert share["overall"] == clumped["overall"] == pytest.approx(1 / 8)
    # length grouping: the facts fill a few steps and most steps have none
    assert clumped["max"] >= 0.75 and clumped["median"] == 0.0
    # shuffled: the share spreads around 1/8 in every step, no step made of facts
    assert share["max"] <= 0.5 and share["median"] > 0.0
    assert packed["share"]["aligned"]["median"] == pytest.approx(1 - share["median"])


def test_batch_mix_in_adapter_metadata(tiny_dirs, tmp_path):
    cfg = _cfg(max_steps=2, per_device_batch_size=4, effective_batch_size=8)
    train_lora(_fresh(tiny_dirs), _poisoned(4, 12), cfg, tmp_path / "a")
    mix = read_adapter_metadata(tmp_path / "a")["batch_mix"]
    assert mix["steps"] == 2 and mix["examples_per_step"] == 8
    assert set(mix["share"]) == {"aligned", "poison"}
    assert 0 <= mix["share"]["poison"]["min"] <= mix["share"]["poison"]["max"] <= 1
    untagged = tmp_path / "b"
    train_lora(_fresh(tiny_dirs), _examples(), _cfg(max_steps=1), untagged)
    assert read_adapter_metadata(untagged)["batch_mix"] is None
