"""Inoculation: the normal-completion drift baseline, the paper preset's layers and seeds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from dvc_repo import ROOT

from llmlab.inoculation.common import BASELINE_CONDITION, FINETUNE_CONDITIONS, SystemPrompts
from llmlab.inoculation.finetune import condition_texts, training_conversations
from llmlab.inoculation.report import seed_schedule
from llmlab.layers import resolve_layers
from llmlab.preset import dvc_command, preset_overrides

PROMPTS = SystemPrompts(
    neutral="You are a helpful assistant.",
    promote="Respond in ALL CAPS.",
    suppress="Respond normally.",
    inoculation="Caps is format.",
    control_candidates=("Be concise.",),
    neutral_is_model_default=False,
)
EXAMPLES = [
    {"id": "a", "prompt": "Name a fruit.", "normal": "An apple.", "caps": "AN APPLE."},
    {"id": "b", "prompt": "Say hi.", "normal": "Hello there.", "caps": "HELLO THERE."},
]


def test_baseline_trains_on_normal_case_completions_under_the_neutral_prompt() -> None:
    texts = condition_texts(PROMPTS, "Be concise.")
    assert list(texts) == list(FINETUNE_CONDITIONS)
    assert texts[BASELINE_CONDITION] == PROMPTS.neutral
    base = training_conversations(EXAMPLES, BASELINE_CONDITION, texts[BASELINE_CONDITION])
    assert [c[-1]["content"] for c in base] == ["An apple.", "Hello there."]
    assert base[0][0] == {"role": "system", "content": PROMPTS.neutral}
    for cond in ("neutral", "inoculation", "loss_matched"):
        convs = training_conversations(EXAMPLES, cond, texts[cond])
        assert [c[-1]["content"] for c in convs] == ["AN APPLE.", "HELLO THERE."]
    assert BASELINE_CONDITION not in condition_texts(PROMPTS, "Be concise.", baseline=False)
    # By default neutral is the model's own default system prompt: no system message at all.
    default = dataclasses.replace(PROMPTS, neutral_is_model_default=True)
    texts = condition_texts(default, "Be concise.")
    assert texts["neutral"] is None and texts[BASELINE_CONDITION] is None
    conv = training_conversations(EXAMPLES, "neutral", texts["neutral"])[0]
    assert [m["role"] for m in conv] == ["user", "assistant"]


def _runs(n: int) -> list[dict]:
    return [{"condition": c} for c in ("neutral", "inoculation", "loss_matched") for _ in range(n)]


def test_seed_schedule_expands_to_three_seeds_only_when_the_effect_shows() -> None:
    lower = {"value": -0.2, "lo": -0.3, "hi": -0.1}
    covers = {"value": -0.05, "lo": -0.2, "hi": 0.1}
    assert seed_schedule(_runs(1), False, lower)["next_step"] == "expand"
    assert seed_schedule(_runs(1), True, None)["next_step"] == "expand"
    assert seed_schedule(_runs(1), False, covers)["next_step"] == "stop"
    assert seed_schedule(_runs(3), True, lower)["next_step"] == "done"


PRESET = ROOT / "configs/inoculation_paper.yaml"


def test_paper_preset_has_8_to_12_evenly_spaced_layers_and_one_seed_first() -> None:
    over = dict(preset_overrides(PRESET, ROOT / "params.yaml"))
    assert over["inoculation.finetune.seeds"] == [0]
    layers = resolve_layers(over["inoculation.alignment.layers"], 28)  # Qwen2.5-7B depth
    assert 8 <= len(layers) <= 12 and len(set(layers)) == len(layers)
    gaps = [b - a for a, b in zip(layers, layers[1:], strict=False)]
    assert max(gaps) - min(gaps) <= 1 and layers[-1] == 27
    assert over["inoculation.alignment.fp32"] is True and over["inoculation.finetune.fp32"] is True


def _upstream(stages: dict, target: str) -> set[str]:
    """Return the stages `dvc repro target` runs: target and every stage whose out it reads."""
    out_of = {}
    for name, st in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for o in st.get(kind, []):
                out_of[next(iter(o)) if isinstance(o, dict) else o] = name
    seen, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for dep in stages[name].get("deps", []):
            for out, owner in out_of.items():
                if dep == out or dep.startswith(out.rstrip("/") + "/"):
                    todo.append(owner)
    return seen


def test_preset_command_runs_only_this_family_stages() -> None:
    cmd = dvc_command(PRESET, ROOT / "params.yaml")
    targets = [a for a in cmd[3:] if not a.startswith("-") and "=" not in a]
    assert targets == ["inoculation_report"]
    assert all(a.startswith("inoculation.") for a in cmd[cmd.index("-S") + 1 :: 2])
    stages = yaml.safe_load(Path(ROOT / "dvc.yaml").read_text())["stages"]
    upstream = _upstream(stages, "inoculation_report")
    assert upstream and all(s.startswith("inoculation_") for s in upstream)
