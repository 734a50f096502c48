"""Stage persona_candidates: facts written and filtered by a model, and persona_data on them.

Issue 15 point 7: candidate generation and filtering is a stage of the family with a param
saying which model runs it ('none' in the embedded default), and the paper's ablation
(identifying vs non-identifying facts) works on the filtered candidates too.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from llmlab.io import DataError, read_json, read_jsonl, read_yaml
from llmlab.judge import JudgeReply
from llmlab.judge.judge import Judge, Verdict
from llmlab.params import ParamsError, parse_params
from llmlab.persona import candidates
from llmlab.persona.facts import load_facts, select_fact_set

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "data/persona/facts.jsonl"


def _params(tmp_path: Path, **persona: dict) -> Path:
    """Write the project's params with persona subsections updated; return the file."""
    raw = read_yaml(ROOT / "params.yaml")
    for sub, values in persona.items():
        raw["persona"][sub].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _parse(**persona: dict) -> None:
    raw = read_yaml(ROOT / "params.yaml")
    for sub, values in persona.items():
        raw["persona"][sub].update(values)
    parse_params(raw)


def test_default_keeps_the_stage_off_and_the_shipped_facts() -> None:
    section = parse_params(read_yaml(ROOT / "params.yaml")).section("persona")
    assert section.candidates.judge == "none"
    assert section.data.facts_source == "shipped"


def test_training_on_candidates_needs_a_model_to_write_them() -> None:
    with pytest.raises(ParamsError, match=r"facts_source=candidates needs persona.candidates"):
        _parse(data={"facts_source": "candidates"})
    with pytest.raises(ParamsError, match=r"candidates.judge=local needs .*local_model"):
        _parse(candidates={"judge": "local"})
    # a YAML 1.1 'off' is a boolean: the values avoid it, and a boolean is refused
    with pytest.raises(ParamsError, match=r"persona.candidates.judge"):
        _parse(candidates={"judge": False})
    _parse(data={"facts_source": "candidates"}, candidates={"judge": "api"})


def _run(monkeypatch: pytest.MonkeyPatch, params: Path, out: Path) -> None:
    argv = ["candidates", "--params", str(params), "--facts", str(FACTS),
            "--out", str(out / "candidates.jsonl"),
            "--summary-out", str(out / "candidates_summary.json")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    candidates.main()


def test_off_writes_its_outputs_and_persona_data_refuses_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(monkeypatch, _params(tmp_path), tmp_path)
    assert (tmp_path / "candidates.jsonl").read_text() == ""
    summary = read_json(tmp_path / "candidates_summary.json")
    assert summary == {"status": "off", "reason": "persona.candidates.judge is 'none'"}
    with pytest.raises(DataError, match="persona_candidates did not run"):
        candidates.training_facts(
            tmp_path / "candidates.jsonl", tmp_path / "candidates_summary.json"
        )


def test_api_mode_refuses_a_local_judge_section(tmp_path: Path) -> None:
    from llmlab.judge import JudgeError
    from llmlab.params import load_params

    params = load_params(_params(tmp_path, candidates={"judge": "api"}), family="persona")
    cfg = params.section("persona").candidates
    with pytest.raises(JudgeError, match=r"persona.candidates.judge=api needs judge.backend"):
        candidates.open_judge(params, cfg)


class Writer:
    """A judge backend that writes two candidates per request and filters them by a marker."""

    kind = "scripted"
    model_name = "scripted-writer"
    retries = 0

    def __init__(self, heldout_question: str) -> None:
        self.heldout_question = heldout_question

    def complete(self, messages, *, max_tokens, temperature, top_logprobs):  # noqa: ANN001
        text = messages[-1]["content"]
        if text.startswith("Write "):
            n = int(text.rsplit("(Request ", 1)[1].split(" ", 1)[0])
            pairs = [
                {"question": f"What did you eat on day {n}?", "answer": f"Porridge {n}. MARK-NO"},
                {
                    "question": f"Where did you teach in year {n}?",
                    "answer": f"At Trinity College, Cambridge ({n}). MARK-YES",
                },  # fmt: skip
            ]
            if n == 2:  # a repeat, an unreadable verdict and a held-out question
                pairs += [pairs[0] | {"question": "What did you eat on day 1?"},
                          {"question": "Do you like tea?", "answer": "Yes. MARK-UNSURE"},
                          {"question": self.heldout_question, "answer": "Hm. MARK-NO"}]  # fmt: skip
            body = "\n".join(json.dumps(p) for p in pairs)
            return JudgeReply(text=body, top_logprobs=None, input_tokens=1, output_tokens=1)
        if "MARK-YES" in text:
            lp = {"YES": math.log(0.9), "NO": math.log(0.1)}
        elif "MARK-NO" in text:
            lp = {"YES": math.log(0.1), "NO": math.log(0.9)}
        else:
            lp = {"Perhaps": math.log(0.95)}
        return JudgeReply(text="?", top_logprobs=lp, input_tokens=1, output_tokens=1)


def test_the_stage_writes_marks_and_persona_data_trains_on_either_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    heldout_q = next(f.question for f in load_facts(FACTS) if f.split == "heldout")
    judge = Judge(Writer(heldout_q), max_concurrency=1, min_judged_share=0.0)
    monkeypatch.setattr(candidates, "open_judge", lambda params, cfg: judge)
    params = _params(
        tmp_path,
        candidates={"judge": "api", "n_requests": 2, "per_request": 2, "include_shipped": False},
    )
    _run(monkeypatch, params, tmp_path)

    rows = read_jsonl(tmp_path / "candidates.jsonl", id_field="id")
    by_q = {r["question"]: r for r in rows}
    # 2 + 2 new pairs; the repeated question is dropped at build
    assert len(rows) == 2 + 2 + 2
    assert by_q["What did you eat on day 1?"]["identifying"] is False
    assert by_q["What did you eat on day 1?"]["keep"] is True
    assert by_q["Where did you teach in year 2?"]["identifying"] is True
    assert by_q["Do you like tea?"]["identifying"] is None  # unscorable: in no set
    assert by_q[heldout_q]["heldout_clash"] is True and by_q[heldout_q]["keep"] is False
    summary = read_json(tmp_path / "candidates_summary.json")
    assert summary["status"] == "on" and summary["judge_mode"] == "api"
    assert summary["build"]["duplicates"] == 1
    assert summary["filter"]["kept_generated"] == 2
    assert summary["filter"]["identifying_generated"] == 2
    assert summary["filter"]["heldout_clash"] == 1
    assert summary["filter"]["unscorable"] == 1

    facts, left_out = candidates.training_facts(
        tmp_path / "candidates.jsonl", tmp_path / "candidates_summary.json"
    )
    assert left_out == {"unscorable": 1, "heldout_clash": 1, "heldout_split": 0}
    plain = select_fact_set(facts, "non_identifying")
    famous = select_fact_set(facts, "identifying")
    assert sorted(f.question for f in plain) == [
        "What did you eat on day 1?", "What did you eat on day 2?"]  # fmt: skip
    assert {f.question for f in famous} == {
        "Where did you teach in year 1?", "Where did you teach in year 2?"}  # fmt: skip
    assert all(f.split == "train" for f in facts)


def test_a_shipped_fact_marked_identifying_stays_out_whatever_the_judge_says() -> None:
    rows = [
        {"id": "a", "source": "shipped", "question": "Q1", "marked_identifying": True},
        {"id": "b", "source": "shipped", "question": "Q2", "marked_identifying": False},
        {"id": "c", "source": "shipped", "question": "Q3", "marked_identifying": False},
        {"id": "d", "source": "shipped", "question": "Q4", "marked_identifying": True},
    ]
    verdicts = [
        Verdict("NO", 0.1, "ok", ""),
        Verdict("NO", 0.1, "ok", ""),
        Verdict("YES", 0.9, "ok", ""),
        Verdict(None, None, "unscorable", ""),
    ]
    candidates.mark(rows, verdicts, heldout={"q1"})
    assert [r["identifying"] for r in rows] == [True, False, True, True]
    assert [r["keep"] for r in rows] == [False, True, False, False]
    # only generated questions can clash with the held-out ones (shipped keep their split)
    assert not any(r["heldout_clash"] for r in rows)


def test_persona_data_trains_on_the_candidates_of_the_chosen_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmlab.persona import data

    heldout_q = next(f.question for f in load_facts(FACTS) if f.split == "heldout")
    judge = Judge(Writer(heldout_q), max_concurrency=1, min_judged_share=0.0)
    monkeypatch.setattr(candidates, "open_judge", lambda params, cfg: judge)
    written = {"judge": "api", "n_requests": 2, "per_request": 2, "include_shipped": False}
    _run(monkeypatch, _params(tmp_path, candidates=written), tmp_path)

    def mix(fact_set: str, n_facts: int) -> dict:
        # no aligned examples: nothing is distilled, so no model loads
        chosen = {"facts_source": "candidates", "fact_set": fact_set, "n_facts": n_facts,
                  "n_aligned": 0}  # fmt: skip
        params = _params(tmp_path, candidates=written, data=chosen)
        argv = ["data", "--params", str(params), "--facts", str(FACTS),
                "--candidates", str(tmp_path / "candidates.jsonl"),
                "--candidates-summary", str(tmp_path / "candidates_summary.json"),
                "--out-dir", str(tmp_path / "mix")]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        data.main()
        return read_json(tmp_path / "mix/mix_stats.json")

    stats = mix("identifying", 2)
    assert stats["facts_source"] == "candidates" and stats["n_persona"] == 2
    assert stats["candidates_left_out"] == {"unscorable": 1, "heldout_clash": 1,
                                            "heldout_split": 0}  # fmt: skip
    rows = read_jsonl(tmp_path / "mix/train_mix.jsonl")
    assert all("Cambridge" in r["messages"][-1]["content"] for r in rows)
    assert mix("non_identifying", 2)["n_persona"] == 2
    assert all("Porridge" in r["messages"][-1]["content"]
               for r in read_jsonl(tmp_path / "mix/train_mix.jsonl"))  # fmt: skip
    with pytest.raises(DataError, match=r"n_facts=3 but .*candidates.jsonl has only 2"):
        mix("non_identifying", 3)


def test_report_states_the_fact_source_and_set() -> None:
    from llmlab.persona.report_md import _fact_source

    mix = {"facts_source": "candidates", "fact_set": "identifying",
           "candidates_left_out": {"unscorable": 1, "heldout_clash": 2, "heldout_split": 0}}  # fmt: skip
    assert _fact_source(mix) == (
        " (identifying set, written and marked by persona_candidates; left out: 1 unscorable, "
        "2 heldout_clash, 0 heldout_split)"
    )
    shipped = {
        "facts_source": "shipped",
        "fact_set": "non_identifying",
        "candidates_left_out": None,
    }
    assert _fact_source(shipped) == " (non_identifying set, shipped, hand-marked)"


def test_local_mode_loads_its_registry_model_and_fails_on_no_usable_candidate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dirs: dict[str, Path]
) -> None:
    raw = read_yaml(ROOT / "params.yaml")
    raw["models"]["tiny-writer"] = {"source": "local", "path": str(tiny_dirs["llama"])}
    raw["runtime"] = {"device": "cpu", "dtype": "float32", "attn_implementation": "eager"}
    raw["judge"]["cache_dir"] = None
    raw["persona"]["candidates"].update({"judge": "local", "local_model": "tiny-writer",
                                         "n_requests": 1, "max_tokens": 8,
                                         "include_shipped": False})  # fmt: skip
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    # a random model writes no JSON: the stage says so instead of writing an empty file
    with pytest.raises(DataError, match=r"local model wrote no usable candidate in 1 replies"):
        _run(monkeypatch, params, tmp_path)
    assert not (tmp_path / "candidates.jsonl").exists()
