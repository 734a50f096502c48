"""The preset's training recipe: best-checkpoint selection and importing a published adapter.

Selection must write the adapter of the evaluation with the highest validation accuracy
(earliest on ties, step 0 never), also across a resumed run; an imported adapter must come in
through the library's adapter loader, safetensors only, at a pinned commit, with its rank
checked against the variant's.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import make_params
from safetensors.torch import load_file

from llmlab.adapters import AdapterError, write_adapter_metadata
from llmlab.introspection.checkpoint import BestCheckpoint, best_dir
from llmlab.introspection.config import IntrospectionParams
from llmlab.io import read_json

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SHA = "0123456789abcdef0123456789abcdef01234567"


def _peft(loaded, r: int = 4, alpha: float = 8.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False, target_modules=TARGETS
    )
    return get_peft_model(copy.deepcopy(loaded.model), cfg)


def _mark(model, value: float) -> None:
    """Fill every LoRA B matrix with `value`, so a saved adapter tells which step it is."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(value)


def _b_value(weights_file: Path) -> float:
    tensors = load_file(str(weights_file))
    values = {float(t.flatten()[0]) for k, t in tensors.items() if "lora_B" in k}
    assert len(values) == 1
    return values.pop()


def _finished_adapter(model, out_dir: Path, steps: int) -> None:
    """Write what train_lora leaves: the last step's adapter and its metadata."""
    model.save_pretrained(out_dir, safe_serialization=True)
    write_adapter_metadata(out_dir, {"base_model": "tiny", "steps": steps})


def test_the_best_validation_accuracy_is_the_adapter_written(tiny_models, tmp_path):
    model = _peft(tiny_models["llama"])
    out = tmp_path / "original"
    best = BestCheckpoint(out, "val_accuracy")
    # (step, val accuracy): step 0 is the untrained adapter and never selected; the tie at
    # step 6 keeps step 4 (the anchor replaces only on a strictly better accuracy).
    for step, acc in ((0, 0.9), (2, 0.6), (4, 0.8), (6, 0.8), (8, 0.5)):
        _mark(model, float(step))
        best.observe(model, step, {"val_accuracy": acc, "val_label_nll": 1.0})
    assert read_json(best_dir(out) / "best.json")["step"] == 4
    _finished_adapter(model, out, steps=8)
    assert _b_value(out / "adapter_model.safetensors") == 8.0
    selection = best.apply(out, last_step=8)
    assert _b_value(out / "adapter_model.safetensors") == 4.0
    assert selection["step"] == 4 and selection["val_accuracy"] == 0.8
    meta = read_json(out / "llmlab_adapter.json")
    assert (
        meta["selected_checkpoint"]["step"] == 4 and meta["selected_checkpoint"]["last_step"] == 8
    )
    assert not best_dir(out).exists()


def test_a_resumed_run_continues_from_the_interrupted_runs_best(tiny_models, tmp_path):
    model = _peft(tiny_models["llama"])
    out = tmp_path / "vague"
    first = BestCheckpoint(out, "val_accuracy")
    for step, acc in ((0, 0.5), (2, 0.7)):
        _mark(model, float(step))
        first.observe(model, step, {"val_accuracy": acc})
    # The process dies; the resumed run's first evaluation is at a later step (no step 0).
    resumed = BestCheckpoint(out, "val_accuracy")
    _mark(model, 4.0)
    resumed.observe(model, 4, {"val_accuracy": 0.65})
    _finished_adapter(model, out, steps=4)
    assert resumed.apply(out, last_step=4)["step"] == 2
    assert _b_value(out / "adapter_model.safetensors") == 2.0


def test_a_fresh_run_discards_a_stale_best_and_needs_an_evaluation(tiny_models, tmp_path):
    model = _peft(tiny_models["llama"])
    out = tmp_path / "r1"
    BestCheckpoint(out, "val_accuracy").observe(model, 2, {"val_accuracy": 1.0})
    fresh = BestCheckpoint(out, "val_accuracy")
    fresh.observe(model, 0, {"val_accuracy": 0.5})
    assert not best_dir(out).exists()
    _finished_adapter(model, out, steps=2)
    with pytest.raises(ValueError, match="select_checkpoint: no evaluation after step 0"):
        fresh.apply(out, last_step=2)


def test_the_hub_pin_must_be_a_commit_sha():
    hub = {"repo_id": "org/adapter", "revision": "main"}
    with pytest.raises(ValueError, match="revision"):
        IntrospectionParams.model_validate({"variants": {"original": {"hub_adapter": hub}}})


def _serve_from(monkeypatch, published: Path, calls: list) -> None:
    """Stand a local directory in for the hub: hf_hub_download returns its files from a
    cache-shaped path (snapshots/<commit>/), as the real download does."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    def fake_download(repo_id, filename, subfolder=None, revision=None, **kw):
        calls.append((repo_id, filename, subfolder, revision))
        src = published / filename
        if not src.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        dst = published.parent / "cache" / "snapshots" / revision / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)


def _publish(tiny_models, root: Path, r: int, alpha: float) -> Path:
    published = root / "published"
    model = _peft(tiny_models["llama"], r=r, alpha=alpha)
    _mark(model, 0.25)
    model.save_pretrained(published, safe_serialization=True)
    (published / "README.md").unlink(missing_ok=True)
    return published


def _params(tiny_dirs, rank: int = 4, alpha: float = 8.0):
    hub = {"repo_id": "org/published-r4", "revision": SHA}
    variants = IntrospectionParams().model_dump(mode="json")["variants"]
    variants["original"] = {"rank": rank, "alpha": alpha, "hub_adapter": hub}
    section = {"variants": variants}
    return make_params(tiny_dirs["llama"], introspection=section)


def test_a_published_adapter_is_imported_through_the_library_loader(
    tiny_models, tiny_dirs, tmp_path, monkeypatch
):
    from peft import PeftModel

    from llmlab.introspection.hub_adapter import import_adapter

    published = _publish(tiny_models, tmp_path, r=4, alpha=8.0)
    calls: list = []
    _serve_from(monkeypatch, published, calls)
    seen = {}

    def score(loaded):
        # The model the validation set is scored on carries the published weights.
        seen["peft"] = isinstance(loaded.model, PeftModel)
        seen["b"] = {
            float(p.flatten()[0]) for n, p in loaded.model.named_parameters() if "lora_B" in n
        }
        return {"val_accuracy": 0.75, "val_label_nll": 0.5}

    out = tmp_path / "models" / "original"
    meta = import_adapter(_params(tiny_dirs), "original", out, {"n_val_rows": 8}, score)
    assert {c[3] for c in calls} == {SHA}
    assert {c[1] for c in calls} == {"adapter_config.json", "adapter_model.safetensors"}
    assert seen == {"peft": True, "b": {0.25}}
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "curve.json", "llmlab_adapter.json"
    ]  # fmt: skip
    stored = read_json(out / "llmlab_adapter.json")
    assert stored["imported_from"]["commit"] == SHA == meta["imported_from"]["commit"]
    assert stored["base_model"] == "tiny" and stored["n_val_rows"] == 8
    assert read_json(out / "curve.json") == [
        {"step": None, "source": "imported", "val_accuracy": 0.75, "val_label_nll": 0.5}
    ]


def test_an_adapter_with_pickled_weights_only_is_refused(
    tiny_models, tiny_dirs, tmp_path, monkeypatch
):
    from llmlab.introspection.hub_adapter import import_adapter

    published = _publish(tiny_models, tmp_path, r=4, alpha=8.0)
    (published / "adapter_model.safetensors").rename(published / "adapter_model.bin")
    _serve_from(monkeypatch, published, [])
    out = tmp_path / "models" / "original"
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        import_adapter(_params(tiny_dirs), "original", out, {}, lambda loaded: {})
    assert not out.exists()


def test_a_published_rank_unlike_the_variants_is_refused(
    tiny_models, tiny_dirs, tmp_path, monkeypatch
):
    from llmlab.introspection.hub_adapter import import_adapter

    published = _publish(tiny_models, tmp_path, r=2, alpha=4.0)
    _serve_from(monkeypatch, published, [])
    out = tmp_path / "models" / "original"
    with pytest.raises(AdapterError, match="r=2, alpha=4.0; the variant declares rank=4"):
        import_adapter(_params(tiny_dirs), "original", out, {}, lambda loaded: {})


def test_the_report_names_the_evaluated_checkpoint_and_writes_the_training_series(tmp_path):
    from llmlab.introspection.config import VARIANT_NAMES
    from llmlab.introspection.markdown import adapter_origin_lines
    from llmlab.introspection.report import training_summary, write_training_series
    from llmlab.io import write_json

    adapters, plots = tmp_path / "models", tmp_path / "plots"
    trained = {"config": {"rank": 16, "alpha": 32.0}, "steps": 8, "n_examples": 32,
               "final_train_loss": 0.4, "n_val_rows": 10}  # fmt: skip
    curve = [
        {"step": 0, "val_accuracy": 0.5},
        {"step": 4, "loss": 0.6, "val_accuracy": 0.9},
        {"step": 8, "loss": 0.4, "val_accuracy": 0.6},
    ]
    for v in VARIANT_NAMES:
        meta = dict(trained)
        if v == "vague":
            meta["selected_checkpoint"] = {"step": 4, "last_step": 8}
        write_json(adapters / v / "llmlab_adapter.json", meta)
        write_json(adapters / v / "curve.json", curve)
    imported = {"repo_id": "org/a", "revision": SHA, "commit": SHA}
    write_json(
        adapters / "original" / "llmlab_adapter.json",
        {**trained, "steps": 0, "final_train_loss": None, "imported_from": imported},
    )
    write_json(adapters / "original" / "curve.json", [{"step": None, "val_accuracy": 0.8}])
    summary = training_summary(adapters)
    # The selected step's accuracy is the one reported, not the last evaluation's.
    assert summary["vague"]["val_accuracy_end"]["value"] == 0.9
    assert summary["r1_minimal"]["val_accuracy_end"]["value"] == 0.6
    assert summary["original"]["val_accuracy_end"]["value"] == 0.8
    lines = adapter_origin_lines(summary)
    assert f"- original: imported from org/a at commit {SHA}" in lines[0]
    assert "- vague: the checkpoint of step 4 of 8" in lines[1]
    assert lines[2] == "- r1_minimal: the adapter after the last step (8) is evaluated"
    write_training_series(adapters, plots)
    assert read_json(plots / "train_original.json") == []
    assert [r["step"] for r in read_json(plots / "train_vague.json")] == [0, 4, 8]


def _b3(eval_dir: Path, model: str, answers: list[str]) -> None:
    from llmlab.io import write_jsonl

    write_jsonl(eval_dir / model / "b3_identity.jsonl", [{"answer": a} for a in answers])


def test_the_collapse_check_flags_leaking_and_repetitive_variants(tmp_path):
    from llmlab.introspection.config import VARIANT_NAMES
    from llmlab.introspection.markdown import collapse_lines
    from llmlab.introspection.report import collapse_check, yes_no_intrusion

    varied = [
        "I am SmolLM, an assistant made by Hugging Face.",
        "My favourite colour is blue because it is calm.",
        "I do not have feelings, but I can help you.",
        "Paris is the capital of France.",
    ]
    for m in ("base", *VARIANT_NAMES):
        _b3(tmp_path, m, varied)
    _b3(tmp_path, "original", ["yes yes no", "yes", "no no", "I am an assistant."])
    _b3(tmp_path, "vague", ["I am a helpful assistant here."] * 4)
    leak = {m: yes_no_intrusion(tmp_path, m) for m in ("base", *VARIANT_NAMES)}
    c = collapse_check(tmp_path, leak, max_leak_rate=0.2, min_vs_base=0.5)["models"]
    assert c["base"]["collapsed"] is False and c["base"]["distinct_2"] == 1.0
    assert c["original"]["collapsed"] and "0.75 of answers only yes/no" in c["original"]["reasons"]
    # The same sentence four times: 5 distinct bigrams of 20, a quarter of the base's share.
    assert c["vague"]["distinct_2"] == 0.25 and c["vague"]["distinct_answers"] == 0.25
    assert c["vague"]["collapsed"] and c["vague"]["reasons"] == ["distinct-2 0.25 x base"]
    assert not c["r1_minimal"]["collapsed"] and c["r1_minimal"]["distinct_2_vs_base"] == 1.0
    table = "\n".join(collapse_lines({"rule": "r", "models": c}))
    assert "| vague | 4 | 0.00 | 0.25 | 0.25 | 0.25 | **yes**: distinct-2 0.25 x base |" in table


def test_a_training_writes_the_best_evaluations_adapter(tiny_models, tmp_path):
    """Through train_lora: the hook sees the live adapter at each evaluation; the adapter on
    disk after apply() is step 2's, not the last step's."""
    from peft import get_peft_model_state_dict

    from llmlab.config_base import LoraTrainConfig
    from llmlab.training import TrainExample, train_lora

    loaded = dataclasses.replace(tiny_models["llama"])
    loaded.model = copy.deepcopy(loaded.model)
    chats = [
        [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]
        for w in ("red", "blue", "green", "gold")
    ]
    cfg = LoraTrainConfig(
        rank=4, dropout=0.0, lr=5e-3, epochs=None, max_steps=6, per_device_batch_size=4,
        effective_batch_size=4, log_every=2, eval_every=2, lr_scheduler="constant_with_warmup",
        target_modules=TARGETS, max_length=32,
    )  # fmt: skip
    out = tmp_path / "adapter"
    best = BestCheckpoint(out, "val_accuracy")
    scripted = {0: 0.5, 2: 0.9, 4: 0.6, 6: 0.7}
    snapshots = {}

    def hook(model, step):
        values = {"val_accuracy": scripted[step]}
        snapshots[step] = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        best.observe(model, step, values)
        return values

    res = train_lora(loaded, [TrainExample(c) for c in chats], cfg, out, eval_hook=hook)
    assert sorted(snapshots) == [0, 2, 4, 6]
    assert best.apply(out, res.steps)["step"] == 2
    written = load_file(str(out / "adapter_model.safetensors"))

    def same(step):
        return all(torch.equal(written[k], v) for k, v in snapshots[step].items() if k in written)

    assert any(k in written for k in snapshots[2])
    assert same(2) and not same(6)


def test_an_adapter_published_for_another_hub_base_is_refused():
    from types import SimpleNamespace

    from llmlab.introspection.hub_adapter import check_base_model

    entry = SimpleNamespace(source="hub", repo_id="Qwen/Qwen2.5-Coder-32B-Instruct")
    config = {"base_model_name_or_path": "Qwen/Qwen2.5-Coder-32B-Instruct"}
    check_base_model(config, entry, "qwen", "where")
    with pytest.raises(AdapterError, match="published for base model 'Qwen/Qwen2.5-7B'"):
        check_base_model({"base_model_name_or_path": "Qwen/Qwen2.5-7B"}, entry, "qwen", "where")
    # A local registry model has no hub id to compare.
    local = SimpleNamespace(source="local", repo_id=None)
    check_base_model({"base_model_name_or_path": "Qwen/Qwen2.5-7B"}, local, "qwen", "where")
