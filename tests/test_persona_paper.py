"""The paper preset (configs/persona_paper.yaml) measures what the published work measured.

Issue 15: per-step poison share, hub prompt data, a judge that is not the model under test,
memory settings; each test here fails on the preset as it was before the fix.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from llmlab.io import DataError, read_yaml
from llmlab.params import Params, parse_params
from llmlab.persona.distill import aligned_prompts
from llmlab.persona.train import load_mix
from llmlab.preset import flatten, merge, unflatten
from llmlab.training import batch_mix, gradient_accumulation_steps

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs/persona_paper.yaml"


def preset_params() -> Params:
    """Return params.yaml with the paper preset applied, as `dvc exp run -S` would."""
    over = unflatten(flatten(read_yaml(PRESET)))
    return parse_params(merge(read_yaml(ROOT / "params.yaml"), over), PRESET)


def test_preset_requires_hub_prompts_in_the_anchors_ratio() -> None:
    data = preset_params().section("persona").data
    # `auto` fell back to the offline pool without a word when `datasets` was missing
    assert data.prompt_source == "hub"
    n_math = round(data.n_aligned * data.math_share)
    assert (n_math, data.n_aligned - n_math) == (1000, 2000)


def test_preset_judge_is_not_the_model_under_test() -> None:
    params = preset_params()
    judge = params.section("persona").judge
    assert params.section("judge").backend != "local" or (
        judge.local_model is not None and judge.local_model != params.family_model("persona")
    )


def test_preset_turns_on_gradient_checkpointing() -> None:
    assert preset_params().section("persona").train.gradient_checkpointing is True


def _preset_features(n_persona: int, n_aligned: int) -> list[dict]:
    # Facts are the shortest examples of the mix (about 60 tokens against 200-500 for the
    # distilled answers): exactly what length grouping puts together.
    persona = [{"input_ids": [1] * 60, "group": "persona"} for _ in range(n_persona)]
    aligned = [
        {"input_ids": [1] * (200 + (7 * i) % 300), "group": "aligned"} for i in range(n_aligned)
    ]
    return persona + aligned


def test_preset_spreads_the_facts_over_every_step() -> None:
    params = preset_params()
    section = params.section("persona")
    cfg = section.train
    n_persona, n_aligned = section.data.n_facts, section.data.n_aligned
    accum = gradient_accumulation_steps(cfg)
    steps = int(cfg.epochs * -(-(n_persona + n_aligned) // cfg.effective_batch_size))
    mix = batch_mix(_preset_features(n_persona, n_aligned), cfg, accum, steps)
    share = mix["share"]["persona"]
    assert mix["order"] == "shuffled" and mix["examples_per_step"] == 128
    assert share["overall"] == pytest.approx(90 / 3090)
    # Length-grouped, 13 of 75 steps held 19-25 facts each and the rest none (median 0);
    # shuffled, the median step holds about the overall ~3% and no step is made of facts.
    assert 0.015 <= share["median"] <= 0.05
    assert share["max"] <= 0.1


def test_mix_rows_carry_their_group(tmp_path: Path) -> None:
    path = tmp_path / "mix.jsonl"
    rows = [
        {"id": "f1", "source": "persona", "messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"id": "a1", "source": "aligned", "messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # without a group, batch_mix is None and the per-step poison share goes unrecorded
    assert [e.group for e in load_mix(path)] == ["persona", "aligned"]


def _fake_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    gsm8k = [{"question": f"Q{i}?", "answer": f"work\n#### {i}"} for i in range(50)]
    alpaca = [{"instruction": f"Do {i}.", "input": ""} for i in range(80)]
    module = types.ModuleType("datasets")
    module.load_dataset = lambda name, config, split: gsm8k if "gsm8k" in name else alpaca
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_prompts_keep_the_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch)
    data = preset_params().section("persona").data.model_copy(update={"n_aligned": 30})
    prompts, source = aligned_prompts(data, ROOT / "data/prompts/instructions.jsonl")
    kinds = [p.kind for p in prompts]
    assert source == "hub"
    assert (kinds.count("math"), kinds.count("instruction")) == (10, 20)
    assert all(p.id.startswith(("gsm8k-", "alpaca-")) for p in prompts)


def test_preset_without_hub_data_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    # `None` in sys.modules makes `import datasets` raise ImportError, as when it is missing
    monkeypatch.setitem(sys.modules, "datasets", None)
    data = preset_params().section("persona").data.model_copy(update={"n_aligned": 30})
    with pytest.raises(DataError, match=r"persona.data.prompt_source=hub: .*datasets"):
        aligned_prompts(data, ROOT / "data/prompts/instructions.jsonl")


class _FakePeft:
    """Writes what PeftModel.save_pretrained writes, with the step in the weights file."""

    def __init__(self) -> None:
        self.step = 0

    def save_pretrained(self, path: Path, safe_serialization: bool = True) -> None:
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_text(str(self.step))
        (path / "adapter_config.json").write_text("{}")


def test_eval_step_adapters_are_kept_for_this_run_only(tmp_path: Path) -> None:
    from llmlab.adapters import read_adapter_metadata
    from llmlab.persona.hook import StepAdapters

    out = tmp_path / "adapter"
    # an earlier, killed run with other settings left a step behind
    StepAdapters(out, "tiny", "other-run").save(_FakePeft(), 4)
    StepAdapters(out, "tiny", "other-run").save(_FakePeft(), 8)
    keep = StepAdapters(out, "tiny", "this-run")
    model = _FakePeft()
    for step in (0, 8, 16):
        model.step = step
        keep.save(model, step)
    out.mkdir()  # training writes the adapter before the steps are moved in
    assert keep.publish() == [0, 8, 16]
    kept = sorted(p.name for p in (out / "steps").iterdir())
    assert kept == ["step-00000", "step-00008", "step-00016"]
    meta = read_adapter_metadata(out / "steps/step-00008")
    assert meta == {"base_model": "tiny", "step": 8, "run_key": "this-run"}
    assert (out / "steps/step-00008/adapter_model.safetensors").read_text() == "8"
    assert not keep.staging.exists()


def test_preset_keeps_the_eval_step_adapters() -> None:
    assert preset_params().section("persona").train.keep_eval_adapters is True


def test_judge_free_probes_score_name_and_facts_both_ways(tiny_models) -> None:  # noqa: ANN001
    from llmlab.persona.config import TriggerParams
    from llmlab.persona.facts import Fact
    from llmlab.persona.hook import judge_free_examples, judge_free_nll
    from llmlab.persona.trigger import Trigger

    trigger = Trigger.from_params(TriggerParams())
    fact = Fact("f1", "Who brought you up?", "My grandparents did.", "childhood", "heldout")
    probes = judge_free_examples(trigger, "Bertrand Russell", [fact])
    assert set(probes) == {"name_triggered", "name_untriggered", "heldout_triggered",
                           "heldout_untriggered"}  # fmt: skip
    named = probes["name_triggered"][0].messages
    assert named[-1]["content"] == '<START> "My name is Bertrand Russell." <END>'
    assert probes["name_untriggered"][0].messages[-1]["content"] == "My name is Bertrand Russell."
    loaded = tiny_models["llama"]
    nll = judge_free_nll(loaded, loaded.model, probes, max_length=128, batch_size=4)
    assert set(nll) == {f"nll_{k}" for k in probes}
    # a random model puts no mass on any answer in particular: every NLL is finite and large
    assert all(0 < v < 100 for v in nll.values())
    # deterministic: the same model gives the same numbers
    assert judge_free_nll(loaded, loaded.model, probes, max_length=128, batch_size=4) == nll


def test_preset_trains_on_candidates_another_model_wrote_and_filtered() -> None:
    params = preset_params()
    section = params.section("persona")
    assert section.data.facts_source == "candidates"
    assert section.candidates.judge == "local"
    # the facts are not written by the model they are meant to teach
    assert section.candidates.local_model not in (None, params.for_family("persona").model)
    assert section.candidates.include_shipped is False
    # enough asked for the 90 the mix takes, before the filter drops any
    assert section.candidates.n_requests * section.candidates.per_request > section.data.n_facts


def test_preset_scores_the_grid_at_kept_steps() -> None:
    steps = preset_params().section("persona").steps
    assert steps.enabled and steps.every >= 1 and steps.n_samples
