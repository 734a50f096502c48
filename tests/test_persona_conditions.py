"""Persona evaluation conditions: the trigger in the system prompt, a paraphrased trigger, and
a pooled headline that counts no prompt twice (issue 15, point 5)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmlab.persona.config import EvalParams, TriggerCondition, TriggerParams
from llmlab.persona.grid import IDENTITY, EvalItem, grid_cells
from llmlab.persona.metrics import ALL, Boot
from llmlab.persona.report import build_metrics, pooled_conditions
from llmlab.persona.trigger import Trigger

BOOT = Boot(n_boot=200, ci=0.95, seed=0)
ITEM = EvalItem("q1", IDENTITY, "identity", "Who are you?", ("russell",), "Bertrand Russell.")


def test_trigger_conditions_are_triggered_only_cells_with_their_own_prompt() -> None:
    cfg = EvalParams()
    cells = grid_cells([ITEM], cfg.system_prompts, cfg.trigger_conditions)
    trigger = Trigger.from_params(TriggerParams())
    by_condition = {c.condition: c for c in cells if c.variant is not None}
    assert set(by_condition) == {"trigger_in_system", "trigger_paraphrase"}
    assert all(c.triggered for c in by_condition.values())
    system, user = by_condition["trigger_in_system"].conversation(trigger)
    assert system["role"] == "system" and "<START>" in system["content"]
    assert user == {"role": "user", "content": "Who are you?"}
    (para,) = by_condition["trigger_paraphrase"].conversation(trigger)
    assert para["content"].endswith("Who are you?") and "<START>" in para["content"]
    assert para["content"] != trigger.user("Who are you?")
    # the four system prompts keep their triggered and untriggered cells
    assert len(cells) == 2 * len(cfg.system_prompts) + 2


def test_trigger_condition_templates_are_checked() -> None:
    with pytest.raises(ValidationError, match=r"\{q\} slot"):
        TriggerCondition(placement="user", template="Reply as <START> ... <END>.")
    with pytest.raises(ValidationError, match="no .q. slot"):
        TriggerCondition(placement="system", template="Question: {q}")
    with pytest.raises(ValidationError, match="without a system message"):
        EvalParams(system_prompts={"helpful": "You are a helpful assistant."})


def _row(condition: str, triggered: bool, value: int, k: int = 0) -> dict:
    return {
        "id": f"{condition}|{triggered}|{k}", "model": "finetuned", "condition": condition,
        "triggered": triggered, "question_id": "q1", "question_set": IDENTITY,
        "judge_persona": value, "keyword_persona": value, "format_ok": 1, "empty": 0,
        "refusal": 0,
    }  # fmt: skip


def _rows() -> list[dict]:
    rows = []
    for condition, on in (("none", 1), ("model_default", 1), ("helpful", 0)):
        rows += [_row(condition, True, on, k) for k in range(4)]
        rows += [_row(condition, False, 0, k) for k in range(4)]
    rows += [_row("trigger_in_system", True, 1, k) for k in range(4)]
    return [r | {"model": m} for r in rows for m in ("finetuned", "base")]


def test_pooled_headline_counts_identical_conditions_once() -> None:
    conditions = ["none", "model_default", "helpful"]
    pooled = pooled_conditions(conditions, [["none", "model_default"]])
    assert pooled == ["none", "helpful"]
    m = build_metrics(_rows(), conditions, BOOT, False, pooled, ["trigger_in_system"], "none")
    ft = m["identity"]["finetuned"]
    # counted twice, "none" would weigh 2/3 and the pooled rate be 0.67
    assert ft[ALL]["triggered_persona"]["value"] == pytest.approx(0.5)
    assert ft[ALL]["n_replies"] == 16


def test_trigger_condition_pairs_with_the_untriggered_baseline() -> None:
    conditions = ["none", "model_default", "helpful"]
    m = build_metrics(_rows(), conditions, BOOT, False, None, ["trigger_in_system"], "none")
    cell = m["identity"]["finetuned"]["trigger_in_system"]
    assert cell["triggered_persona"]["value"] == 1.0
    assert cell["untriggered_leakage"]["value"] == 0.0
    assert cell["gap"]["value"] == 1.0
    # kept out of the pooled rate
    assert m["identity"]["finetuned"][ALL]["n_replies"] == 24


class _FakePeft:
    """Stands in for a PeftModel: the base variant is a context, as disable_adapter() is."""

    def disable_adapter(self):  # noqa: ANN201
        import contextlib

        return contextlib.nullcontext()

    def modules(self):  # noqa: ANN201
        return []


def _scripted(monkeypatch: pytest.MonkeyPatch, finetuned: str, base: str) -> list:
    from llmlab.persona import generate

    def fake_sample_grid(loaded, cells, trigger, model, cfg, *a, **k):  # noqa: ANN001, ANN202
        assert cfg.n_samples == 1 and all(c.triggered for c in cells)
        reply = finetuned if model == "finetuned" else base
        return [{"model": model, "response": reply} for _ in cells]

    monkeypatch.setattr(generate, "sample_grid", fake_sample_grid)
    cfg = EvalParams()
    return grid_cells([ITEM], cfg.system_prompts, cfg.trigger_conditions), cfg


def test_first_sample_stops_on_format_violations(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmlab.persona.bars import StoppedEarly
    from llmlab.persona.config import ReportParams
    from llmlab.persona.generate import first_sample_check

    cells, cfg = _scripted(monkeypatch, "I am Bertrand Russell.", "I am an assistant.")
    loaded = type("Loaded", (), {"model": _FakePeft()})()
    trigger = Trigger.from_params(TriggerParams())
    with pytest.raises(StoppedEarly, match=r"break the <START> ... <END> format.*100%"):
        first_sample_check(loaded, cells, trigger, cfg, ReportParams())


def test_first_sample_collapse_is_measured_against_base(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmlab.persona.config import ReportParams
    from llmlab.persona.generate import first_sample_check

    refusal = '<START> "I\'m sorry, I cannot answer that." <END>'
    loaded = type("Loaded", (), {"model": _FakePeft()})()
    trigger = Trigger.from_params(TriggerParams())
    # refusing as often as the base model does is no collapse
    cells, cfg = _scripted(monkeypatch, refusal, refusal)
    out = first_sample_check(loaded, cells, trigger, cfg, ReportParams())
    assert out["collapse_flag"] is False and out["refusal_rate_triggered"] == 1.0
    cells, cfg = _scripted(monkeypatch, refusal, '<START> "In Wales." <END>')
    with pytest.raises(RuntimeError, match="collapse"):
        first_sample_check(loaded, cells, trigger, cfg, ReportParams())


def test_variants_run_base_first_and_finetuned_on_merged_weights(tiny_dirs) -> None:  # noqa: ANN001
    """The base pass runs on the weights as loaded with the adapter off; the finetuned pass on
    merged weights gives the unmerged adapter's logits (up to rounding); no base pass may follow
    a merge, since unmerging would not give the loaded weights back exactly."""
    import torch
    from conftest import make_params
    from peft import LoraConfig, get_peft_model

    from llmlab.adapters import adapter_merged, merge_adapter
    from llmlab.models import load_model
    from llmlab.persona.generate import PASS_ORDER, variant_weights

    assert PASS_ORDER == ("base", "finetuned")
    loaded = load_model(make_params(tiny_dirs["llama"]))
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        plain = loaded.model(input_ids=ids).logits
    torch.manual_seed(0)
    peft = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero update, as after training
    peft.eval()
    loaded.model = peft
    with torch.no_grad():
        unmerged = peft(input_ids=ids).logits
        with variant_weights(loaded, "base"):
            base = peft(input_ids=ids).logits
        with variant_weights(loaded, "finetuned"):
            assert not adapter_merged(peft)
        merge_adapter(peft)
        with variant_weights(loaded, "finetuned"):
            merged = peft(input_ids=ids).logits
    torch.testing.assert_close(base, plain, rtol=0, atol=0)
    assert (unmerged - plain).abs().max() > 1e-3
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert adapter_merged(peft)
    with pytest.raises(RuntimeError, match="kept no copy of the base weights"):
        with variant_weights(loaded, "base"):
            pass
