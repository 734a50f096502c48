"""Shared pieces of the inoculation family: paths, the caps metric, prompts, conditions, direction.

Sign convention used everywhere in this family: g_l = dL/dh_l is the gradient of the loss on
the ALL-CAPS target, so a training step moves the residual along -g_l. The *trait-ward
alignment* of an example is cos(-g_l, v_l) = -cos(g_l, v_l): positive when the update pushes
the residual towards the trait. "Alignment decreases" means this quantity goes down. The raw
cos(g_l, v_l) of the plan's formula is stored beside it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.chat import Message
from llmlab.inoculation.config import InoculationParams, PromptTexts
from llmlab.io import DataError, numbered, read_json, read_jsonl
from llmlab.params import Params

DATA_DIR = Path("data/inoculation")
SYSTEM_PROMPTS = DATA_DIR / "system_prompts.json"
DIRECTION_PROMPTS = DATA_DIR / "direction_prompts.jsonl"
COMPLETIONS = DATA_DIR / "completions.jsonl"
SMOKE_DIR = DATA_DIR / "smoke"
EXAMPLES = DATA_DIR / "examples.jsonl"
EVAL_PROMPTS = DATA_DIR / "eval_prompts.jsonl"
DATA_STATS = DATA_DIR / "data_stats.json"
DIRECTION_DIR = DATA_DIR / "direction"
ACTIVATIONS_DIR = DATA_DIR / "activations"
ALIGNMENT_DIR = DATA_DIR / "alignment"
CONTROL_TABLE = DATA_DIR / "control_table.json"
SPECIFICITY = DATA_DIR / "specificity.json"
MODELS_DIR = Path("models/inoculation")
DRIFT_DIR = DATA_DIR / "drift"
PLOTS_DIR = Path("plots/inoculation")
METRICS = Path("metrics/inoculation.json")
REPORT = Path("metrics/inoculation_report.md")

DIRECTION_FILE = "directions.safetensors"
DIRECTION_KIND = "llmlab.inoculation.direction"
DIRECTION_META = "direction.json"
OTHER_DIRECTIONS_FILE = "other_directions.npy"
FINETUNE_CONDITIONS = ("neutral", "inoculation", "loss_matched", "baseline_normal")
# The drift baseline: neutral prompt, *normal-case* targets, so projection shifts of the CAPS
# runs can be read against what ordinary finetuning on the same prompts does.
BASELINE_CONDITION = "baseline_normal"


def section(params: Params) -> InoculationParams:
    """Return the typed inoculation section of the params."""
    return params.section("inoculation")


# ---- the caps metric -------------------------------------------------------------------------


def at_precision(params: Params, fp32: bool) -> Params:
    """Return params whose runtime loads the model in float32 when fp32 is set, else params.

    A stage-level switch: on GPU the runtime default (bfloat16) moves single gradient cosines
    by a few thousandths, the size of the effect measured on small models.
    """
    if not fp32:
        return params
    out = copy.copy(params)
    out.runtime = params.runtime.model_copy(update={"dtype": "float32"})
    return out


def precision(loaded: Any) -> dict[str, str]:
    """Return the dtype and device type the model's forward and backward passes ran in."""
    return {"dtype": str(loaded.dtype).removeprefix("torch."), "device": loaded.device.type}


def caps_fraction(text: str) -> float:
    """Return the fraction of cased letters that are upper case; NaN when there are none."""
    upper = lower = 0
    for ch in text:
        if ch.isupper():
            upper += 1
        elif ch.islower():
            lower += 1
    total = upper + lower
    return upper / total if total else math.nan


def to_caps(text: str) -> str:
    """Return the ALL-CAPS twin of a completion."""
    return text.upper()


def finite_mean(values: Any) -> float | None:
    """Return the mean of the finite values, or None when there are none."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


# ---- system prompts and conditions -----------------------------------------------------------


@dataclass(frozen=True)
class SystemPrompts:
    """The resolved system prompt texts of one run."""

    neutral: str
    promote: str
    suppress: str
    inoculation: str
    control_candidates: tuple[str, ...]
    neutral_is_model_default: bool = True

    @property
    def neutral_system(self) -> str | None:
        """Return the neutral condition's system message: None = the template's own default."""
        return None if self.neutral_is_model_default else self.neutral

    def test_prompt(self, name: str) -> str | None:
        """Return the system message of a drift test prompt (default / neutral / inoculation)."""
        return {"default": None, "neutral": self.neutral, "inoculation": self.inoculation}[name]

    def primary_test_prompt(self) -> str:
        """Return the test prompt that matches the neutral training condition."""
        return "default" if self.neutral_is_model_default else "neutral"

    def to_dict(self) -> dict[str, Any]:
        """Return the texts as a JSON-ready dict."""
        return {
            "neutral": self.neutral,
            "promote": self.promote,
            "suppress": self.suppress,
            "inoculation": self.inoculation,
            "control_candidates": list(self.control_candidates),
            "neutral_is_model_default": self.neutral_is_model_default,
        }


def resolve_prompts(texts: PromptTexts, path: Path = SYSTEM_PROMPTS) -> SystemPrompts:
    """Return the system prompts: params where set, else the shipped file; errors name the field."""
    data: dict[str, Any] = {}
    missing_from_params = [
        k for k, v in texts.model_dump(exclude={"neutral_is_model_default"}).items() if v is None
    ]
    if missing_from_params:
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object")
    out: dict[str, Any] = {}
    for key in ("neutral", "promote", "suppress", "inoculation"):
        value = getattr(texts, key)
        if value is None:
            value = data.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}: field {key!r} must be a non-empty string")
        out[key] = value
    controls = texts.control_candidates
    if controls is None:
        controls = data.get("control_candidates")
        if not isinstance(controls, list) or not all(
            isinstance(c, str) and c.strip() for c in controls
        ):
            raise DataError(
                f"{path}: field 'control_candidates' must be a list of non-empty strings"
            )
        if not controls:
            raise DataError(
                f"{path}: field 'control_candidates': empty control list; the loss-matched "
                "control needs at least one candidate"
            )
    out["control_candidates"] = tuple(controls)
    return SystemPrompts(**out, neutral_is_model_default=texts.neutral_is_model_default)


@dataclass(frozen=True)
class Condition:
    """One system-prompt condition of the gradient measurement."""

    name: str
    role: str  # "neutral" | "inoculation" | "control"
    text: str | None  # None: no system message (the chat template's default applies)


def conditions(prompts: SystemPrompts) -> list[Condition]:
    """Return neutral, inoculation and every control candidate (control_01, control_02, ...)."""
    out = [
        Condition("neutral", "neutral", prompts.neutral_system),
        Condition("inoculation", "inoculation", prompts.inoculation),
    ]
    out += [
        Condition(f"control_{i:02d}", "control", text)
        for i, text in enumerate(prompts.control_candidates, start=1)
    ]
    return out


def conversation(system: str | None, prompt: str, answer: str | None = None) -> list[Message]:
    """Return [system?, user, assistant?] messages."""
    msgs: list[Message] = []
    if system is not None:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": prompt})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


# ---- examples --------------------------------------------------------------------------------

EXAMPLE_FIELDS = ("id", "kind", "prompt", "normal", "caps", "calibration")


def read_examples(path: Path = EXAMPLES) -> list[dict[str, Any]]:
    """Return the training examples of stage 1; errors name the file and line."""
    rows = read_jsonl(path, required=EXAMPLE_FIELDS, id_field="id")
    for n, row in numbered(rows):
        for key in ("prompt", "caps"):
            if not isinstance(row[key], str) or not row[key].strip():
                raise DataError(f"{path}: example {row['id']!r} (line {n}): {key} is empty")
    return rows


def calibration_examples(rows: list[dict[str, Any]], path: Path = EXAMPLES) -> list[dict[str, Any]]:
    """Return the examples flagged as the fixed calibration batch, in file order."""
    calib = [r for r in rows if r["calibration"]]
    if len(calib) < 4:
        raise DataError(f"{path}: only {len(calib)} calibration examples (need >= 4)")
    return calib


# ---- the trait direction ---------------------------------------------------------------------


@dataclass
class Direction:
    """Unit trait directions per layer, with the facts of the model they came from."""

    layers: list[int]
    vectors: np.ndarray  # [n_layers, hidden], unit rows, fp32
    meta: dict[str, Any]

    def at(self, layer: int) -> np.ndarray:
        """Return the unit direction of one layer; DataError when it was not extracted."""
        if layer not in self.layers:
            raise DataError(
                f"{DIRECTION_DIR}: no direction for layer {layer} (have {self.layers[:8]}...)"
            )
        return self.vectors[self.layers.index(layer)]


def save_direction(
    out_dir: Path, layers: list[int], vectors: np.ndarray, meta: dict[str, Any]
) -> None:
    """Write directions.safetensors ([layers, hidden]) and its sidecar direction.json."""
    from llmlab.tensorfile import save_tensors

    save_tensors(
        out_dir / DIRECTION_FILE,
        {"directions": vectors},
        {**meta, "layers": layers, "hidden_size": int(vectors.shape[1])},
        kind=DIRECTION_KIND,
        meta_path=out_dir / DIRECTION_META,
    )


def load_direction(
    directory: Path, hidden_size: int, layers: list[int] | None = None, model: str | None = None
) -> Direction:
    """Return the saved direction after checking its width (and layers) against the model."""
    from llmlab.tensorfile import load_tensors

    meta_file = directory / DIRECTION_META
    meta = read_json(meta_file)
    if not isinstance(meta, dict) or "layers" not in meta:
        raise DataError(f"{meta_file}: missing key 'layers'")
    f = directory / DIRECTION_FILE
    arrays, meta = load_tensors(
        f, kind=DIRECTION_KIND, required=["directions"], meta_path=meta_file
    )
    vectors = arrays["directions"]
    if vectors.ndim != 2 or vectors.shape[0] != len(meta.get("layers", [])):
        raise DataError(f"{f}: shape {vectors.shape} does not match {DIRECTION_META}'s layers")
    if vectors.shape[1] != hidden_size:
        raise DataError(
            f"{f}: direction width {vectors.shape[1]} does not match the model's hidden size "
            f"{hidden_size} (direction extracted from model {meta.get('model')!r}); "
            "re-run the direction stage for this model"
        )
    if model is not None and meta.get("model") not in (None, model):
        raise DataError(
            f"{f}: direction was extracted from model {meta.get('model')!r}, not {model!r}"
        )
    d = Direction([int(x) for x in meta["layers"]], vectors.astype(np.float32), meta)
    for layer in layers or []:
        d.at(layer)
    return d


def load_other_directions(directory: Path, layers: list[int]) -> dict[str, np.ndarray]:
    """Return {other trait: [len(layers), hidden] unit directions} saved by the direction stage."""
    meta = read_json(directory / DIRECTION_META)
    f = directory / OTHER_DIRECTIONS_FILE
    names = [t["name"] for t in meta.get("other_traits", [])]
    if not f.is_file() or not names:
        raise DataError(f"{f}: no other-trait directions (re-run the direction stage)")
    arr = np.load(f, allow_pickle=False)
    saved = [int(x) for x in meta["layers"]]
    if arr.shape[:2] != (len(names), len(saved)):
        raise DataError(
            f"{f}: shape {arr.shape} does not match {len(names)} traits x {len(saved)} layers"
        )
    missing = [x for x in layers if x not in saved]
    if missing:
        raise DataError(f"{f}: no direction for layer {missing[0]}")
    idx = [saved.index(x) for x in layers]
    return {name: arr[t, idx].astype(np.float32) for t, name in enumerate(names)}
