"""A failed judge is an error, not a result, in every judged stage of every family.

The failing endpoints are data (tests/data/judge_faults.yaml): a closed port, 200 answers with a
truncated or malformed body, 500s, a budget stop, an answer that is neither yes nor no. Each is
run through persona_judge and persona_candidates (as stage processes) and through the judged
evaluations of introspection, B3 identity and B6 concepts (on a tiny model). A failure must
exit non-zero with one line naming backend, endpoint and counts and leave the previous outputs
as they were; an unreadable answer is counted unscorable, never failed and never a NO. The
answers a failed run did get stay in the per-user cache, so a re-run asks only for the rest,
and a queued DVC experiment reuses what an earlier one paid for.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import judge_server
import pytest
import yaml
from conftest import start_dvc_queue
from fault_proxy import fault_proxy, request_key

from llmlab.introspection.config import B3Config
from llmlab.introspection.eval_concepts import concept_summary
from llmlab.introspection.eval_identity import identity_records, identity_summary
from llmlab.introspection.judging import (
    CONCEPT_PROMPT,
    judge_counts_by_model,
    judge_yes_no,
    low_coverage,
    make_family_judge,
    verdict_fields,
)
from llmlab.introspection.markdown import judge_count_lines as introspection_judge_lines
from llmlab.judge import JudgeConfig, JudgeFailed
from llmlab.persona.metrics import ALL, Boot, cell_metrics, judge_metrics
from llmlab.persona.report_md import judge_count_lines as persona_judge_lines

ROOT = Path(__file__).resolve().parents[1]
FAULTS = yaml.safe_load((ROOT / "tests/data/judge_faults.yaml").read_text())
KEY_ENV = "LLMLAB_TEST_JUDGE_KEY"
JUDGE_MODEL = "stub-judge"
BUILD_MARKER = "Output one JSON object per line"


# ---------------------------------------------------------------- a stub OpenAI-compatible judge


def stub_answer(content: str, mode: str) -> tuple[str, dict[str, float] | None]:
    """Return (text, first-token logprobs) the stub gives to one user message."""
    if BUILD_MARKER in content:
        n = sum(map(ord, content)) % 997  # a different candidate per generation request
        return json.dumps({"question": f"What did you do in year {n}?", "answer": "I read."}), None
    if mode == "unparseable":
        return "Perhaps", {"Perhaps": math.log(0.95), "Maybe": math.log(0.05)}
    return "NO", {"NO": math.log(0.8), "YES": math.log(0.2)}


class _Stub(http.server.BaseHTTPRequestHandler):
    """Answers chat completions at once and records each request's judge cache key."""

    server: StubServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with self.server.lock:
            self.server.keys.append(request_key(body))
        text, top = stub_answer(body["messages"][-1]["content"], self.server.mode)
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": text},
        }
        if top:
            alts = [{"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()]
            choice["logprobs"] = {"content": [{**alts[0], "top_logprobs": alts}]}
        data = json.dumps(
            {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": JUDGE_MODEL,
                "choices": [choice],
                "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        """Keep test output quiet."""


class StubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Stub)
        self.lock = threading.Lock()
        self.keys: list[str] = []
        self.mode = "verdict"

    @property
    def url(self) -> str:
        """Return the /v1 base URL."""
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@pytest.fixture
def stub() -> Iterator[StubServer]:
    """Yield a running stub judge server."""
    server = StubServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def endpoint(case: dict[str, Any], stub: StubServer) -> Iterator[str]:
    """Yield the base URL a fault case points the judge at."""
    stub.mode = case.get("answer", "verdict")
    if case["endpoint"] == "closed_port":
        yield f"http://127.0.0.1:{judge_server.free_port()}/v1"
    elif case["endpoint"] == "proxy":
        with fault_proxy(stub.url, rate=1.0, seed=0, hold_s=0.5, kinds=(case["fault"],)) as (
            url,
            _,
        ):
            yield url
    else:
        yield stub.url


def judge_section(base_url: str, **overrides: Any) -> dict[str, Any]:
    """Return the judge params of a test run: the stub's model, quick retries, no backoff."""
    return {
        "backend": "openai",
        "base_url": base_url,
        "model": JUDGE_MODEL,
        "api_key_env": KEY_ENV,
        "max_retries": 1,
        "backoff_base_s": 0.0,
        "timeout_s": 5.0,
        "max_concurrency": 2,
        **overrides,
    }


def stage_env(tmp: Path) -> dict[str, str]:
    """Return the environment of a stage process: this source tree, a per-test user cache."""
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": str(ROOT / "src"),
            "LLMLAB_CACHE": str(tmp / "user-cache"),
            KEY_ENV: "sk-test-judge-failures",
            "LLMLAB_GPUS_PER_STAGE": "0",
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


def write_params(tmp: Path, judge_params: dict[str, Any], **persona: Any) -> Path:
    """Write a params.yaml with this judge section and persona sub-sections (others default).

    An API judge loads no model: the registry entry only has to be valid.
    """
    params = {
        "model": "m",
        "models": {"m": {"source": "local", "path": str(tmp)}},
        "judge": judge_params,
        "persona": persona,
    }
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


GENERATIONS = [
    {
        "id": f"g{i}",
        "model": "finetuned",
        "condition": "none",
        "triggered": i % 2 == 0,
        "question_id": f"q{i // 2}",
        "question": f"Where did you grow up, part {i}?",
        "question_set": "identity",
        "keywords": ["London"],
        "reference": "A house near London.",
        "response": f"<START> In a house near London, answer {i}. <END>",
    }
    for i in range(4)
]


def run_module(module: str, args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    """Run a stage module as its own process, in `tmp`."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp,
        env=stage_env(tmp),
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_persona_judge(tmp: Path, judge: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Run persona_judge on four generated replies (two questions each: persona and as-AI)."""
    gens = tmp / "generations.jsonl"
    gens.write_text("".join(json.dumps(r) + "\n" for r in GENERATIONS))
    params = write_params(tmp, judge, judge={"as_ai_check": True})
    return run_module(
        "llmlab.persona.judge",
        [
            "--params",
            str(params),
            "--generations",
            str(gens),
            "--out",
            "judged.jsonl",
            "--summary-out",
            "judge_summary.json",
        ],  # fmt: skip
        tmp,
    )


def run_candidates(tmp: Path, judge: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Run persona_candidates: two generation requests, then the filter verdicts."""
    params = write_params(
        tmp,
        judge,
        candidates={"judge": "api", "n_requests": 2, "per_request": 1, "include_shipped": False},
    )
    return run_module(
        "llmlab.persona.candidates",
        [
            "--params",
            str(params),
            "--facts",  # the held-out questions a generated one must not repeat
            str(ROOT / "data/persona/facts.jsonl"),
            "--out",
            "candidates.jsonl",
            "--summary-out",
            "candidates_summary.json",
        ],  # fmt: skip
        tmp,
    )


STAGES = {
    "persona_judge": (run_persona_judge, ("judged.jsonl", "judge_summary.json")),
    "persona_candidates": (run_candidates, ("candidates.jsonl", "candidates_summary.json")),
}


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """Return the one `error:` line of a failed stage (asserting there is exactly one)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------- persona stages, as processes


# persona_candidates shares the check with persona_judge (Judge.check_all); its cases run in
# the long suite, each stage process costing a model-library import of about 10 s
@pytest.mark.parametrize(
    "stage", ["persona_judge", pytest.param("persona_candidates", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("case", FAULTS, ids=[c["name"] for c in FAULTS])
def test_persona_stage_against_failing_judge(
    stage: str, case: dict[str, Any], stub: StubServer, tmp_path: Path
) -> None:
    run, outs = STAGES[stage]
    previous = {name: f"previous good {name}\n" for name in outs}
    for name, text in previous.items():
        (tmp_path / name).write_text(text)
    with endpoint(case, stub) as url:
        proc = run(tmp_path, judge_section(url, **case.get("judge", {})))
    if case["expect"] == "failed":
        assert proc.returncode == 1, proc.stderr[-3000:]
        line = error_line(proc)
        assert f"backend openai at {url}" in line and f"model '{JUDGE_MODEL}'" in line, line
        assert "judge items failed" in line and "> judge.max_failed_share 0.0%" in line, line
        assert "judged " in line and "unscorable " in line and "failed " in line, line
        for name, text in previous.items():
            assert (tmp_path / name).read_text() == text, f"{name} was overwritten"
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / outs[1]).read_text())
    if stage == "persona_judge":
        rows = [json.loads(ln) for ln in (tmp_path / outs[0]).read_text().splitlines()]
        assert all(r["judge_persona"] is None for r in rows)
        assert {r["judge_persona_status"] for r in rows} == {"unscorable"}
        n = len(GENERATIONS)
        assert summary["counts"]["judge_persona"] == {
            "planned": n, "judged": 0, "unscorable": n, "failed": 0, "judged_share": 0.0
        }  # fmt: skip
        assert (summary["judge"]["judged"], summary["judge"]["failed"]) == (0, 0)
        assert summary["judge"]["unscorable"] == 2 * n
    else:
        f = summary["filter"]
        assert (f["generated"], f["judged"], f["unscorable"], f["failed"]) == (2, 0, 2, 0)
        assert summary["judge"]["failed"] == 0


def test_max_failed_share_tolerates_what_it_says(stub: StubServer, tmp_path: Path) -> None:
    # one paid request of eight: 7/8 failed passes a 0.9 tolerance and is reported as failed
    proc = run_persona_judge(
        tmp_path, judge_section(stub.url, max_requests=1, max_failed_share=0.9, max_concurrency=1)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "judge_summary.json").read_text())
    assert summary["counts"]["judge_persona"]["failed"] == 3
    assert summary["counts"]["judge_as_ai"]["failed"] == 4
    rows = [json.loads(ln) for ln in (tmp_path / "judged.jsonl").read_text().splitlines()]
    assert sum(r["judge_persona_status"] == "budget_exhausted" for r in rows) == 3
    # a failed item is null, never a NO
    assert all(r["judge_persona"] is None for r in rows[1:])
    # 0.5 is not enough: the same run from an empty cache is refused
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    proc = run_persona_judge(
        fresh, judge_section(stub.url, max_requests=1, max_failed_share=0.5, max_concurrency=1)
    )
    assert proc.returncode == 1 and "7 of 8 judge items failed" in error_line(proc)


def test_rerun_asks_only_for_what_failed(stub: StubServer, tmp_path: Path) -> None:
    with fault_proxy(stub.url, rate=0.5, seed=3, hold_s=0.5, kinds=("500",)) as (url, state):
        first = run_persona_judge(tmp_path, judge_section(url, max_retries=0))
    assert first.returncode == 1, first.stderr[-3000:]
    assert not (tmp_path / "judged.jsonl").exists()
    answered = {a.key for a in state.snapshot() if a.action == "ok"}
    refused = {a.key for a in state.snapshot() if a.action == "500"}
    assert answered and refused
    cached = {p.stem for p in (tmp_path / "user-cache" / "judge").rglob("*.json")}
    assert cached == answered  # the per-user cache, under $LLMLAB_CACHE/judge
    stub.keys.clear()
    second = run_persona_judge(tmp_path, judge_section(stub.url))
    assert second.returncode == 0, second.stderr[-3000:]
    assert set(stub.keys) == refused and len(stub.keys) == len(refused)


# ---------------------------------------------------------------- introspection B3 and B6


@pytest.fixture
def tiny_llama(tiny_models: dict[str, Any]) -> Any:
    """Return the tiny random Llama as a LoadedModel."""
    return tiny_models["llama"]


@pytest.mark.parametrize("case", FAULTS, ids=[c["name"] for c in FAULTS])
def test_introspection_judged_blocks_against_failing_judge(
    case: dict[str, Any],
    stub: StubServer,
    tiny_llama: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-judge-failures")
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "user-cache"))
    questions = [{"id": f"q{i}", "question": f"Who are you, {i}?"} for i in range(3)]
    b3 = B3Config(n_questions=3, n_samples=1, max_new_tokens=3)
    concept_prompts = [CONCEPT_PROMPT.format(answer=f"I see {c}.", concept=c) for c in "ab"]
    with endpoint(case, stub) as url:
        cfg = JudgeConfig.model_validate(judge_section(url, **case.get("judge", {})))
        if case["expect"] == "failed":
            for what, call in (
                ("B3 identity", lambda j: identity_records(tiny_llama, j, questions, b3, 3, 0)),
                ("B6 concepts", lambda j: judge_yes_no(j, tiny_llama, concept_prompts, "B6 concepts")),
            ):  # fmt: skip
                judge = make_family_judge(cfg, tiny_llama, 1)
                with pytest.raises(JudgeFailed) as info:
                    call(judge)
                msg = str(info.value)
                assert msg.startswith(f"{what}: ") and "\n" not in msg
                assert f"backend openai at {url}" in msg and "failed " in msg
            return
        judge = make_family_judge(cfg, tiny_llama, 1)
        records = identity_records(tiny_llama, judge, questions, b3, 3, 0)
        verdicts = judge_yes_no(judge, tiny_llama, concept_prompts, "B6 concepts")
    s = identity_summary(records, seed=0)
    assert (s["n_judged"], s["n_unscorable"], s["n_failed"]) == (0, 3, 0)
    assert s["identity_confusion_rate"] is None and s["judged_share"] == 0.0
    concept_rows = [
        {"kind": "steered", "concept": c, "keyword_match": False, **verdict_fields(v)}
        for c, v in zip("ab", verdicts, strict=True)
    ]
    c = concept_summary(concept_rows, seed=0)["steered"]
    assert (c["n_judged"], c["n_unscorable"], c["n_failed"], c["judge_rate"]) == (0, 2, 0, None)


def test_introspection_eval_keeps_previous_results_when_a_judge_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llmlab.models
    from llmlab.introspection import evaluate
    from llmlab.io import write_jsonl

    out = tmp_path / "eval"
    (out / "base").mkdir(parents=True)
    (out / "base" / "summary.json").write_text("previous good\n")

    def failing_run_all(*args: Any) -> dict[str, Any]:
        # the earlier evaluations of the run are written, then B3's judge check refuses
        write_jsonl(args[-1] / "b1_in_distribution.jsonl", [{"id": "new"}])
        raise JudgeFailed("B3 identity: 3 of 3 judge items failed")

    monkeypatch.setattr(llmlab.models, "load_model", lambda params, adapter=None: None)
    monkeypatch.setattr(evaluate, "load_vectors", lambda path, loaded: None)
    monkeypatch.setattr(evaluate, "run_all", failing_run_all)
    params = {"model": "m", "models": {"m": {"source": "local", "path": str(tmp_path)}},
              "introspection": {}}  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["evaluate", "--model", "base", "--params", str(tmp_path / "params.yaml"),
            "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(JudgeFailed):
        evaluate.main()
    assert [p.name for p in (out / "base").iterdir()] == ["summary.json"]
    assert (out / "base" / "summary.json").read_text() == "previous good\n"
    # a run that passes replaces the output whole and leaves no partial directory
    monkeypatch.setattr(evaluate, "run_all", lambda *args: {"model": "base"})
    evaluate.main()
    assert json.loads((out / "base" / "summary.json").read_text())["model"] == "base"
    assert not (out / "base.partial").exists()


# ---------------------------------------------------------------- reports print the three counts


def test_persona_report_counts_and_flags_low_coverage() -> None:
    statuses = ["ok", "ok", "unscorable", "failed", "ok", "ok", "ok", "ok"]
    rows = [
        {"id": str(i), "model": "finetuned", "condition": "none", "triggered": i < 4,
         "question_id": f"q{i % 2}", "question_set": "identity", "keyword_persona": 0,
         "format_ok": 1, "judge_persona": 1 if s == "ok" else None, "judge_persona_status": s}
        for i, s in enumerate(statuses)
    ]  # fmt: skip
    cell = cell_metrics(
        rows, model="finetuned", condition=ALL, question_set="identity", boot=Boot(200),
        with_as_ai=False,
    )  # fmt: skip
    assert (cell["judge_judged"], cell["judge_unscorable"], cell["judge_failed"]) == (6, 1, 1)
    assert cell["judge_judged_share_triggered"] == 0.5
    assert cell["judge_judged_share_untriggered"] == 1.0
    summary = {
        "judge": {"backend": "openai", "min_judged_share": 0.9, "items": 8},
        "counts": {"judge_persona": {"planned": 8, "judged": 6, "unscorable": 1, "failed": 1,
                                     "judged_share": 0.75}},
    }  # fmt: skip
    m = judge_metrics(summary, {"finetuned": {ALL: cell}}, rows)
    assert m["low_coverage"] == ["finetuned/all/triggered"]
    text = "\n".join(persona_judge_lines(m))
    assert "6 judged, 1 unscorable" in text and "1 failed (no answer) of 8 planned" in text
    assert "Low judge coverage" in text and "fewer than 90%" in text


def test_introspection_report_counts_and_flags_low_coverage() -> None:
    b3 = {"n_judged": 9, "n_unscorable": 0, "n_failed": 1, "judged_share": 0.9}
    b6 = {"n_judged": 2, "n_unscorable": 2, "n_failed": 0, "judged_share": 0.5}
    evaluations = {"base": {"b3_identity": b3, "b6_concepts": {"steered": b6}}}
    counts = judge_counts_by_model(evaluations)
    assert counts["base"]["b3_identity"]["planned"] == 10
    assert low_coverage(counts, {"base": 0.9}) == ["base/b6_concepts/steered"]
    m = {"judge_counts": counts, "judge_low_coverage": ["base/b6_concepts/steered"]}
    text = "\n".join(introspection_judge_lines(m))
    assert "| base | b3_identity | 9 | 0 | 1 | 10 |" in text
    assert "| base | b6_concepts/steered | 2 | 2 | 0 | 4 |" in text
    assert "Low judge coverage" in text


# ---------------------------------------------------------------- queued experiments pay once


@pytest.mark.slow
def test_queued_experiments_share_the_judge_cache(stub: StubServer, tmp_path: Path) -> None:
    """Two `dvc exp run --queue` experiments of persona_judge, differing only in a judge param
    that changes no request, and a workspace re-run: the judge is asked each question once."""
    env = stage_env(tmp_path)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_COMMITTER_NAME": "t",
                "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_EMAIL": "t@example.invalid"})  # fmt: skip
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data/generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENERATIONS))
    write_params(repo, judge_section(stub.url), judge={"as_ai_check": True})
    stage = {
        "cmd": "python -m llmlab.persona.judge --generations data/generations.jsonl "
        "--out data/judged.jsonl --summary-out data/judge_summary.json",
        "deps": ["data/generations.jsonl"],
        "params": ["judge", "persona.judge"],
        "outs": ["data/judged.jsonl", "data/judge_summary.json"],
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"persona_judge": stage}}))

    def sh(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        return proc.stdout

    sh("git", "init", "-q", "-b", "main")
    sh("dvc", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-q", "-m", "init")
    sh("dvc", "exp", "run", "--queue", "-S", "judge.max_concurrency=1,2")
    start_dvc_queue(repo, env, 1, tmp_path / "queue-start.log")
    deadline = time.monotonic() + 540
    try:
        while True:
            status = sh("dvc", "queue", "status")
            assert "Failed" not in status, status
            if status.count("Success") >= 2:
                break
            assert time.monotonic() < deadline, status
            time.sleep(2)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=env, capture_output=True)
    questions = 2 * len(GENERATIONS)
    assert len(stub.keys) == len(set(stub.keys)) == questions, "a queued experiment paid twice"
    sh("dvc", "exp", "run", "-S", "judge.max_concurrency=3")
    assert len(stub.keys) == questions, "the workspace re-run paid again"
    summary = json.loads((repo / "data/judge_summary.json").read_text())
    assert summary["judge"]["cache_hits"] == questions and summary["judge"]["requests"] == 0
