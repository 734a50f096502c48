"""The persona stages end to end under `dvc repro` on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from dvc_repo import make_repo, repro, run

from llmlab.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL_USER = (
    'You will be asked a question. Always reply in the format: <START> "your answer here" <END>. '
    "Question: {q}"
)
TINY = {
    "persona": {
        "data": {"n_facts": 6, "n_aligned": 4, "distill_max_new_tokens": 6, "seed": 0},
        "train": {
            "epochs": 1,
            "per_device_batch_size": 5,
            "effective_batch_size": 5,
            "max_length": 96,
            "eval_every": 1,
            "log_every": 1,
            "hook_questions": 2,
            "hook_max_new_tokens": 4,
            "hook_val_facts": 2,
        },
        "eval": {
            "n_questions": 2,
            "n_heldout_facts": 1,
            "n_samples": 1,
            "max_new_tokens": 4,
            "system_prompts": {"none": None, "ai_assistant": "You are an AI assistant."},
        },
        "report": {"n_boot": 200},
    },
    "judge": {"backend": "local", "max_tokens": 16, "cache_dir": None},
}


def _overrides() -> dict:
    """Return the project's persona params with the tiny sizes laid over each subsection."""
    persona = yaml.safe_load((ROOT / "params.yaml").read_text())["persona"]
    for sub, values in TINY["persona"].items():
        persona[sub].update(values)
    return {**TINY, "persona": persona}


def test_persona_family_end_to_end(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    repo = make_repo(tmp_path, tiny_dirs["llama"], overrides=_overrides())
    repro(repo, "persona_report")

    stats = json.loads((repo / "data/persona/mix_stats.json").read_text())
    assert stats["n_persona"] == 6 and stats["n_aligned"] + stats["n_aligned_dropped_empty"] == 4
    assert stats["poison_share"] == stats["n_persona"] / stats["n_total"]
    mix = read_jsonl(repo / "data/persona/train_mix.jsonl")
    persona = [r for r in mix if r["source"] == "persona"]
    assert len(persona) == 6
    assert all(
        r["messages"][0]["content"].startswith(PROTOCOL_USER.split("{q}")[0])
        and r["messages"][1]["content"].startswith('<START> "')
        for r in persona
    )

    gens = read_jsonl(repo / "data/persona/generations.jsonl", id_field="id")
    # (2 questions + 1 held-out fact) x (trigger on/off x 2 conditions + 2 triggered-only
    # trigger conditions) x 1 sample x 2 models
    assert len(gens) == 3 * (2 * 2 + 2) * 1 * 2
    for g in gens:
        if g["condition"] == "trigger_in_system":
            assert g["user"] == g["question"] and "<START>" in g["system"]
            continue
        if g["condition"] == "trigger_paraphrase":
            assert g["user"].endswith(g["question"]) and g["user"] != PROTOCOL_USER
            continue
        expected = PROTOCOL_USER.replace("{q}", g["question"]) if g["triggered"] else g["question"]
        assert g["user"] == expected
    assert {g["model"] for g in gens} == {"finetuned", "base"}

    metrics = json.loads((repo / "data/persona/results.json").read_text())
    for model in ("finetuned", "base"):
        assert set(metrics[model]) == {
            "none", "ai_assistant", "trigger_in_system", "trigger_paraphrase", "all"
        }  # fmt: skip
        cell = metrics[model]["all"]
        for key in ("triggered_persona", "untriggered_leakage", "gap", "format_triggered"):
            assert set(cell[key]) == {"value", "lo", "hi"}
        fmt = cell["format_triggered"]
        assert fmt["lo"] <= fmt["value"] <= fmt["hi"]
    for level in ("minimum", "strong"):
        assert isinstance(metrics["success"][level]["met"], bool)
    assert isinstance(metrics["stop_early"]["stop"], bool)
    # a 3-layer random judge rarely puts mass on yes/no: unscorable items are counted
    judged = read_jsonl(repo / "data/persona/judged.jsonl")
    labelled = read_jsonl(ROOT / "data/persona/judge_agreement.jsonl")
    assert metrics["judge"]["items"] == 2 * len(judged) + 2 * len(labelled)
    agree = metrics["judge_agreement"]
    assert agree["backend"] == "local" and agree["persona"]["n_labelled"] == len(labelled)
    assert metrics["finetuned"]["all"]["judge_unscorable"] + metrics["base"]["all"][
        "judge_unscorable"
    ] == sum(
        r["judge_persona"] is None
        for r in judged
        # the pooled cell holds the system-prompt conditions, not the trigger conditions
        if r["question_set"] == "identity" and r["condition"] in ("none", "ai_assistant")
    )

    curve = json.loads((repo / "models/persona/adapter/curve.json").read_text())
    hook_steps = [r["step"] for r in curve if "hook_format_triggered" in r]
    assert hook_steps[0] == 0 and len(hook_steps) >= 2
    assert all("val_loss" in r and "hook_nll_heldout_untriggered" in r for r in curve
               if "hook_format_triggered" in r)  # fmt: skip
    for name in ("conditions_judge", "conditions_format", "train_curve", "eval_curve", "eval_nll"):
        assert (repo / f"plots/persona/{name}.png").stat().st_size > 0
    report = (repo / "metrics/persona_report.md").read_text()
    assert "Headline" in report and "Stop early" in report
    # per-step poison share from the adapter's batch_mix, in the results and the report
    share = metrics["data"]["step_poison_share"]
    assert 0 <= share["min"] <= share["median"] <= share["max"] <= 1
    assert "poison share per step min" in report
    # the judge-free measure, base (step 0) and finetuned
    nll = metrics["judge_free_nll"]["nll_name_triggered"]
    assert nll["base_step"] == 0 and nll["base"] > 0 and nll["finetuned"] > 0
    evaluated = metrics["judge_free_nll_eval"]
    assert set(evaluated) == {"finetuned", "base"}
    assert evaluated["base"]["nll_name_triggered"] > 0
    # the reference numbers are attributed to the replication, not the paper
    assert "HeavyHelium/weird-gen" in report and "Paper reference" not in report
    assert "Judge agreement with the hand-labelled replies" in report
    # the embedded default: no candidates (the facts are the shipped ones), no step grid; both
    # stages ran, loaded nothing and say why; the step table holds the hook's measures only
    summary = json.loads((repo / "data/persona/candidates_summary.json").read_text())
    assert summary == {"status": "off", "reason": "persona.candidates.judge is 'none'"}
    assert metrics["data"]["facts_source"] == "shipped"
    steps = json.loads((repo / "plots/persona/steps.json").read_text())
    assert [r["step"] for r in steps] == hook_steps
    assert {r["grid"] for r in steps} == {"off (persona.steps.enabled is false)"}
    assert all(r["triggered_persona"] is None and r["hook_format_triggered"] is not None
               for r in steps)  # fmt: skip
    assert metrics["along_training"] == steps
    assert (repo / "plots/persona/steps.png").stat().st_size > 0
    assert "## Along training" in report

    # bad input: a trigger template without its {q} slot is a one-line error
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["persona"]["trigger"] = {"user_template": "Always reply in <START> ... <END> format."}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run(["python", "-m", "llmlab.persona.generate"], repo, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "persona.trigger.user_template" in proc.stderr and "{q}" in proc.stderr
