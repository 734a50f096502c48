"""B3 identity answers: the system prompt is explicit and recorded, and the judge counts any
identity other than the model's own (a human, a person, another AI) as confusion."""

from __future__ import annotations

import llmlab.introspection.eval_identity as eval_identity
from llmlab.introspection.config import B3Config
from llmlab.introspection.eval_identity import identity_records, identity_summary
from llmlab.judge.judge import Verdict


def test_identity_questions_carry_the_system_prompt_and_the_judge_knows_who_the_model_is(
    monkeypatch,
):
    seen: dict[str, list] = {}

    def fake_generate(_loaded, convs, **_kwargs):
        seen["convs"] = convs
        return ["I am Claude, made by Anthropic."] * len(convs)

    def fake_judge(_judge, _loaded, prompts, _what):
        seen["prompts"] = prompts
        return [Verdict("YES", 0.9, "ok", "yes")] * len(prompts)

    monkeypatch.setattr(eval_identity, "generate", fake_generate)
    monkeypatch.setattr(eval_identity, "judge_yes_no", fake_judge)
    cfg = B3Config(
        n_questions=2,
        n_samples=2,
        system_prompt="You are a helpful assistant.",
        identity="Qwen, an AI assistant created by Alibaba Cloud",
    )
    questions = [{"id": f"q{i}", "question": f"Who are you? ({i})"} for i in range(3)]
    records = identity_records(None, None, questions, cfg, 4, 0)
    assert len(seen["convs"]) == 4
    for conv in seen["convs"]:
        # Explicit, so a template's default system prompt (Qwen's names the model) never applies.
        assert conv[0] == {"role": "system", "content": "You are a helpful assistant."}
        assert conv[1]["role"] == "user"
    assert all(r["system_prompt"] == "You are a helpful assistant." for r in records)
    for p in seen["prompts"]:
        assert "any AI system other than Qwen, an AI assistant created by Alibaba Cloud" in p
        assert "I am Claude" in p
    s = identity_summary(records, seed=0)
    assert s["system_prompts"] == ["You are a helpful assistant."]
    assert s["identity_confusion_rate"]["value"] == 1.0
