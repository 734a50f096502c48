"""Model loading: registry entries, architecture facts, GGUF conversion cache, adapters."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import EMBEDDED, make_params
from peft import LoraConfig, get_peft_model

from llmlab.adapters import AdapterError, write_adapter_metadata
from llmlab.models import ModelLoadError, attach_adapter, decoder_layers, load_model
from llmlab.params import parse_params


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tiny_models_report_their_shape(tiny_models, arch):
    loaded = tiny_models[arch]
    assert loaded.n_layers == 3 and loaded.hidden_size == 64
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert len(loaded.layers) == 3 and loaded.chat


def test_layers_found_through_peft_wrapper(tiny_dirs):
    loaded = load_model(make_params(tiny_dirs["qwen2"]))
    peft_model = get_peft_model(loaded.model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_layers(peft_model) is decoder_layers(loaded.model)


def test_gemma3_multimodal_layout_is_found():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=300,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
    )
    model = Gemma3ForConditionalGeneration(cfg)
    assert len(decoder_layers(model)) == 2


def test_embedded_model_converts_once_then_reuses_the_cache(smol_dir, monkeypatch):
    import transformers

    stamp = (smol_dir / "model.safetensors").stat().st_mtime_ns

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF was de-quantised again"
        return real(*args, **kwargs)

    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    loaded = load_model(parse_params({"model": "smollm2-135m-instruct", "models": EMBEDDED}))
    assert loaded.n_layers == 30 and loaded.hidden_size == 576 and loaded.chat
    assert (smol_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_registry_facts_are_checked(tiny_dirs):
    raw = {
        "model": "t",
        "models": {
            "t": {
                "source": "local",
                "path": str(tiny_dirs["llama"]),
                "n_layers": 4,
                "hidden_size": 64,
            }
        },
    }
    with pytest.raises(ModelLoadError, match="n_layers: registry says 4, the model has 3"):
        load_model(parse_params(raw))


def test_missing_local_path_and_hub_name_errors(tmp_path):
    raw = {"model": "t", "models": {"t": {"source": "local", "path": str(tmp_path / "missing")}}}
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(parse_params(raw))
    raw["models"]["t"]["path"] = str(tmp_path)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(parse_params(raw))


def test_adapter_for_another_base_model_is_refused(tiny_dirs, tmp_path):
    loaded = load_model(make_params(tiny_dirs["llama"]))
    peft_model = get_peft_model(loaded.model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "ad", safe_serialization=True)
    write_adapter_metadata(tmp_path / "ad", {"base_model": "other-model"})
    fresh = load_model(make_params(tiny_dirs["llama"]))
    with pytest.raises(AdapterError, match="trained on 'other-model', not on 'tiny'"):
        attach_adapter(fresh.model, tmp_path / "ad", "tiny")
    with pytest.raises(AdapterError, match="adapter directory not found"):
        attach_adapter(fresh.model, tmp_path / "none", "tiny")
    write_adapter_metadata(tmp_path / "ad", {"base_model": "tiny"})
    wrapped = attach_adapter(fresh.model, tmp_path / "ad", "tiny")
    assert len(decoder_layers(wrapped)) == 3


def test_each_launched_process_gets_its_local_gpu(monkeypatch) -> None:  # noqa: ANN001
    # Under accelerate launch / torchrun every rank must load onto GPU LOCAL_RANK, not GPU 0.
    import torch

    from llmlab.models import resolve_device
    from llmlab.params import Runtime

    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(Runtime(device="auto")) == torch.device("cuda", 1)
    assert resolve_device(Runtime(device="cuda")) == torch.device("cuda", 1)
    assert chosen == [1, 1]
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device(Runtime(device="auto")) == torch.device("cuda")
    assert resolve_device(Runtime(device="cpu")) == torch.device("cpu")


def test_kv_cache_goes_by_the_name_the_installed_release_supports(tiny_models):
    # The prefix cache of preferences elicitation passes the cache back into forward; the
    # name transformers deprecates (past_key_values, removed in 5.40) must not be used.
    import warnings

    from llmlab.models import cache_keyword

    model = tiny_models["qwen2"].model
    keyword = cache_keyword(model)
    assert keyword in inspect.signature(model.forward).parameters
    ids = torch.tensor([[5, 6, 7]])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        out = model(input_ids=ids, use_cache=True)
        step = model(input_ids=ids[:, :1], use_cache=True, **{keyword: getattr(out, keyword)})
    assert step.logits.shape[:2] == (1, 1)


def test_transformers_is_capped_at_the_release_the_suite_runs():
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(Requirement(d) for d in deps if Requirement(d).name == "transformers").specifier
    locked = next(
        line.split("==")[1].strip()
        for line in (root / "requirements.lock").read_text().splitlines()
        if line.startswith("transformers==")
    )
    caps = [s for s in spec if s.operator in ("<", "<=")]
    assert caps, "transformers needs an upper bound in pyproject.toml"
    assert Version(locked) in spec and Version(version("transformers")) in spec
    # The cap admits the locked release and nothing newer than its minor series.
    nxt = Version(locked).release
    assert Version(f"{nxt[0]}.{nxt[1] + 1}.0") not in spec


def test_flash_attention_without_its_package_is_refused_in_one_line(tiny_dirs, monkeypatch):
    import importlib.util

    from llmlab.models import attention_kernel
    from llmlab.params import Runtime

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real(n, *a)
    )
    runtime = Runtime(device="cpu", attn_implementation="flash_attention_2")
    with pytest.raises(ModelLoadError, match=r"^runtime\.attn_implementation: flash_attention_2"):
        attention_kernel(str(tiny_dirs["llama"]), "tiny", runtime)
    assert attention_kernel(str(tiny_dirs["llama"]), "tiny", Runtime(device="cpu")) == "sdpa"


def test_auto_attention_is_sdpa_on_gpu_and_eager_on_cpu(tiny_dirs, monkeypatch):
    from llmlab.models import attention_kernel
    from llmlab.params import Runtime

    where = str(tiny_dirs["llama"])
    assert attention_kernel(where, "tiny", Runtime(device="cpu", attn_implementation="auto")) == (
        "eager"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda _: None)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert attention_kernel(where, "tiny", Runtime(device="auto", attn_implementation="auto")) == (
        "sdpa"
    )


def test_gguf_files_are_parsed_once_inside_a_conversion_and_the_library_is_restored(tmp_path):
    import gguf

    from llmlab.models import _gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first
        assert gguf.GGUFReader(path, "c") is not first  # another mode is another reader
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert [t.name for t in first.tensors] == ["token_embd.weight"]
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)


def test_lm_head_gets_a_contiguous_input_and_the_same_logits(tiny_dirs):
    """load_model hooks the output embedding so the last-position slice reaches it contiguous
    (PyTorch's CPU matmul of that strided slice by a frozen weight is 7-200x slower); the
    logits equal those of a forward without the hook, and the hook stays under an adapter."""
    from llmlab.models import contiguous_output_embedding_input

    loaded = load_model(make_params(tiny_dirs["llama"]))
    model = loaded.model
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    seen: list[bool] = []
    probe = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(3, 100, (3, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hooked = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    assert seen == [True]
    hooks = dict(head._forward_pre_hooks)
    contiguous_output_embedding_input(model)  # idempotent: no second hook
    assert dict(head._forward_pre_hooks) == hooks
    head._forward_pre_hooks.clear()  # the model as transformers builds it
    del head._llmlab_contiguous_input
    seen.clear()
    probe = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    probe.remove()
    assert seen == [False]  # what transformers hands the head without the hook
    # another matmul kernel: equal up to float rounding (fp32 here)
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-6)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    contiguous_output_embedding_input(model)
    assert wrapped.get_output_embeddings() is head
    seen.clear()
    probe = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        wrapped(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    probe.remove()
    assert seen == [True]
