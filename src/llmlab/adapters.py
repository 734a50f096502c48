"""Saved LoRA adapters: safetensors weights plus a metadata file naming their base model.

`check_adapter` reads every file of an adapter without loading a model (safetensors header,
peft's adapter_config.json, llmlab's metadata), so a truncated or foreign adapter fails in
one line before minutes are spent loading the base model. `check_target_modules` refuses LoRA
target names that match no module of the model (peft would train the others silently).
`merge_adapter` and `base_weights` switch a loaded adapter between its merged weights and the
exact base model, for stages that run both (a finetuned model and a local judge, or a finetuned
and a base variant).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llmlab.io import read_json, write_json

METADATA_FILE = "llmlab_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
REQUIRED_METADATA = ("base_model",)


class AdapterError(ValueError):
    """An adapter is missing, incomplete, or belongs to another base model."""


def write_adapter_metadata(adapter_dir: Path, metadata: dict[str, Any]) -> None:
    """Write the adapter's metadata (base model, params, data hashes, final losses)."""
    write_json(adapter_dir / METADATA_FILE, metadata)


def read_adapter_metadata(adapter_dir: Path) -> dict[str, Any]:
    """Return the adapter's metadata; error naming the file when it is absent or incomplete."""
    meta = adapter_dir / METADATA_FILE
    if not meta.is_file():
        raise AdapterError(f"{adapter_dir}: not an llmlab adapter ({METADATA_FILE} missing)")
    data = read_json(meta)
    if not isinstance(data, dict):
        raise AdapterError(f"{meta}: expected a JSON object")
    missing = [k for k in REQUIRED_METADATA if k not in data]
    if missing:
        raise AdapterError(f"{meta}: missing key {missing[0]!r}")
    return data


def check_safetensors(path: Path) -> list[str]:
    """Return the tensor names of a safetensors file after checking its header and its length."""
    from safetensors import SafetensorError, safe_open

    try:
        # safe_open parses the header and checks that the file holds every byte it declares,
        # which is what a truncated copy or an interrupted download lacks.
        with safe_open(str(path), framework="numpy") as fh:
            names = list(fh.keys())
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path}: not a complete safetensors file ({e})") from None
    if not names:
        raise AdapterError(f"{path}: holds no tensors")
    return names


def check_adapter(adapter_dir: Path, base_model: str) -> dict[str, Any]:
    """Return the adapter metadata after checking its files and that it fits `base_model`."""
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: adapter directory not found")
    if not (adapter_dir / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{adapter_dir}: {WEIGHTS_FILE} missing")
    meta = read_adapter_metadata(adapter_dir)
    trained_on = meta["base_model"]
    if trained_on != base_model:
        raise AdapterError(
            f"{adapter_dir}: adapter was trained on {trained_on!r}, not on {base_model!r}"
        )
    peft_config = adapter_dir / PEFT_CONFIG_FILE
    if not peft_config.is_file():
        raise AdapterError(f"{adapter_dir}: {PEFT_CONFIG_FILE} missing")
    if not isinstance(read_json(peft_config), dict):
        raise AdapterError(f"{peft_config}: expected a JSON object")
    check_safetensors(adapter_dir / WEIGHTS_FILE)
    return meta


def check_target_modules(model: Any, target_modules: Iterable[str], where: str) -> None:
    """Fail unless every LoRA target name matches at least one module of `model`.

    A name matches as peft matches a list of names: the module's full dotted name equals it or
    ends with `.<name>`. The error names the unmatched targets (under the param path `where`)
    and lists the leaf names LoRA could wrap.
    """
    modules = [(n, m) for n, m in model.named_modules() if n]
    unmatched = [
        t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n, _ in modules)
    ]
    if unmatched:
        # Leaves with a 2-D weight: Linear, GPT-2's Conv1D and embeddings, what LoRA can wrap.
        candidates = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in modules
                if getattr(getattr(m, "weight", None), "ndim", 0) == 2 and not any(m.children())
            }
        )
        raise AdapterError(
            f"{where}: {', '.join(repr(t) for t in unmatched)} "
            f"{'matches' if len(unmatched) == 1 else 'match'} no module of the model "
            f"(it has: {', '.join(candidates)})"
        )


def adapter_merged(model: Any) -> bool:
    """Return whether a PeftModel's LoRA weights are merged into the base weights."""
    return any(getattr(m, "merged", False) for m in model.modules() if hasattr(m, "lora_A"))


# Attribute of a PeftModel merged by merge_adapter(keep_base=True): CPU copies of the base
# weights (and biases) the merge changed, by module name.
_KEPT_BASE = "_llmlab_base_weights"


def _lora_layers(model: Any) -> Iterator[tuple[str, Any]]:
    return ((n, m) for n, m in model.named_modules() if hasattr(m, "lora_A"))


def merge_adapter(model: Any, keep_base: bool = False) -> None:
    """Merge a PeftModel's LoRA weights into its base weights (a merged forward runs at base speed).

    keep_base: first keep a CPU copy of every base weight the merge changes, so that
    `base_weights` can later run the exact base model. Without it no base pass may follow:
    peft's unmerge subtracts the LoRA product in the weights' dtype, which in bfloat16 does not
    give the loaded weights back (and merging again would not give the merged ones back).
    """
    if adapter_merged(model):
        return
    if keep_base:
        kept = {}
        for name, layer in _lora_layers(model):
            base = layer.get_base_layer()
            bias = getattr(base, "bias", None)
            kept[name] = (
                base.weight.detach().to("cpu", copy=True),
                None if bias is None else bias.detach().to("cpu", copy=True),
            )
        setattr(model, _KEPT_BASE, kept)
    model.merge_adapter()


@contextlib.contextmanager
def base_weights(model: Any) -> Iterator[None]:
    """Run the block as the base model: the exact base weights, the adapter off.

    An unmerged adapter is switched off (peft's disable_adapter). A merged one needs the copy
    `merge_adapter(keep_base=True)` kept: the base weights are copied back for the block, and the
    adapter is merged again from them afterwards, which gives the merged weights bit for bit as
    before (the merge is the same computation on the same weights). A merge without that copy is
    refused. A model without adapters runs as it is.
    """
    disable = getattr(model, "disable_adapter", None)
    if not callable(disable):
        yield
        return
    if not adapter_merged(model):
        with disable():
            yield
        return
    kept = getattr(model, _KEPT_BASE, None)
    if kept is None:
        raise RuntimeError(
            "base-model pass on merged LoRA weights that kept no copy of the base weights "
            "(merge with keep_base=True, or run base passes before merging)"
        )
    import torch

    with torch.no_grad():
        for name, layer in _lora_layers(model):
            weight, bias = kept[name]
            base = layer.get_base_layer()
            base.weight.copy_(weight)
            if bias is not None:
                base.bias.copy_(bias)
            # peft's record of merged adapters; with it empty the layer runs unmerged
            layer.merged_adapters.clear()
    try:
        with disable():
            yield
    finally:
        model.merge_adapter()
