"""Fault injection: SIGKILLed activation capture, a judge behind a faulty proxy, killed DVC runs.

The short versions run by default; `pytest -m slow tests/test_reliability_faults.py` runs the
long ones (20+ kills of capture, a larger judge workload, repeated kills of `dvc repro`).
This file is also the worker script the tests start and kill:
`python tests/test_reliability_faults.py capture|judge ...`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:  # run as a worker script
    sys.path.insert(0, str(TESTS))

from fault_proxy import (  # noqa: E402
    ALWAYS_FAIL_MARKER,
    CLIENT_GONE,
    ProxyState,
    expected_outcome,
    fault_proxy,
    shared_judge_server,
)

from llmlab.activations import (  # noqa: E402
    INDEX_FILE,
    PROGRESS_FILE,
    CaptureItem,
    capture_to_disk,
    layer_file,
    load_activations,
    read_index,
)
from llmlab.judge import JudgeConfig, make_judge  # noqa: E402
from llmlab.judge.cache import cache_key  # noqa: E402
from llmlab.judge.judge import TOP_LOGPROBS  # noqa: E402


@pytest.fixture(scope="module")
def warm_server() -> str:
    """Return the URL of the shared loopback llama-cpp server (skip when it cannot run)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: install llama-cpp-python[server]")
    try:
        return shared_judge_server(JUDGE_MODEL, TOP_LOGPROBS)
    except RuntimeError as e:
        pytest.skip(str(e))


# ---------------------------------------------------------------- shared helpers

CAPTURE = {"n_items": 72, "batch_size": 4, "save_every": 3, "delay_s": 0.03, "layers": [0, 1, 2]}
JUDGE_MODEL = "smollm2-135m"
KEY_ENV = "LLMLAB_TEST_JUDGE_KEY"
FAKE_KEY = "sk-test-fault-0123456789"
MAX_RETRIES = 6
TIMEOUT_S = 3.0  # the judge's per-request timeout
HOLD_S = 3.5  # how long the proxy holds a "timeout" fault: past the client's timeout


def worker_env() -> dict[str, str]:
    """Return the environment of worker processes: one torch thread, offline, quiet."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "LLMLAB_LOG": "WARNING",
            KEY_ENV: FAKE_KEY,
        }
    )
    return env


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start this file as a worker in its own session, stdout and stderr to `log`."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=worker_env(),
            start_new_session=True,
        )


def kill_when(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], extra_s: float, limit_s: float = 240
) -> bool:
    """SIGKILL `proc` `extra_s` after `ready()` turns true; False when it exited first."""
    deadline = time.monotonic() + limit_s
    while not ready():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("worker made no progress before the deadline")
        time.sleep(0.004)
    time.sleep(extra_s)
    if proc.poll() is not None:
        return False
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: `dvc repro` and its stage too
    except ProcessLookupError:
        pass
    # it may have exited on its own in the instant before the signal
    return proc.wait() == -signal.SIGKILL


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    """Wait for a worker to exit 0; fail with its log otherwise."""
    rc = proc.wait(timeout=timeout)
    if rc != 0:
        raise AssertionError(f"worker exited {rc}:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # In-process forward passes of tiny models gain nothing from threads on a busy machine.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- activation capture


def capture_items(n: int) -> list[CaptureItem]:
    """Return `n` deterministic conversations of varied length."""
    words = "the quick brown fox jumps over a lazy dog near quiet rivers".split()
    return [
        CaptureItem(
            f"q{i:03d}",
            [{"role": "user", "content": f"Item {i}: " + " ".join(words[: 1 + (i * 7) % 11])}],
        )
        for i in range(n)
    ]


def capture_worker(model_dir: str, out: str, rows_log: str) -> None:
    """Run capture_to_disk on the tiny model, logging rows and pausing on each forward pass."""
    import torch
    from conftest import make_params

    from llmlab.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(make_params(Path(model_dir)))

    def on_forward(_module: Any, _inputs: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        with open(rows_log, "a") as fh:
            fh.write(f"{hidden.shape[0]}\n")
        time.sleep(CAPTURE["delay_s"])  # widens the window a kill can land in

    loaded.layers[0].register_forward_hook(on_forward)
    capture_to_disk(
        loaded,
        capture_items(CAPTURE["n_items"]),
        CAPTURE["layers"],
        out,
        batch_size=CAPTURE["batch_size"],
        save_every=CAPTURE["save_every"],
        progress=False,
    )


def rows_logged(path: Path) -> list[int]:
    """Return the batch sizes a worker logged, one per forward pass started."""
    if not path.is_file():
        return []
    return [int(x) for x in path.read_text().split()]


def done_rows(out: Path) -> int:
    """Return how many rows a re-run would not recompute, read from the checkpoint files."""
    work = out.with_name(out.name + ".partial")
    if (work / INDEX_FILE).is_file():
        return CAPTURE["n_items"]  # all rows flushed; only the final rename is left
    prog = work / PROGRESS_FILE
    return int(np.load(prog).sum()) if prog.is_file() else 0


def assert_complete(out: Path, reference: Path) -> None:
    """Fail unless `out` holds every layer of the reference run, equal up to float noise."""
    assert read_index(out)["ids"] == read_index(reference)["ids"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for layer in CAPTURE["layers"]:
        got = load_activations(out, layer).values
        want = load_activations(reference, layer).values
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def capture_reference(tiny_models, tmp_path_factory) -> Path:
    """Return the output directory of one uninterrupted in-process capture run."""
    out = tmp_path_factory.mktemp("capture_ref") / "acts"
    capture_to_disk(
        tiny_models["llama"],
        capture_items(CAPTURE["n_items"]),
        CAPTURE["layers"],
        out,
        batch_size=CAPTURE["batch_size"],
        save_every=CAPTURE["save_every"],
        progress=False,
    )
    return out


def kill_capture_repeatedly(
    model_dir: Path, reference: Path, tmp: Path, kills: int, seed: int, chain: int
) -> dict[str, int]:
    """Kill capture workers at random points `kills` times, resuming after each kill.

    Runs chains of up to `chain` kills on one output directory (each kill followed by a
    resuming run), then lets the last run finish and compares with the reference. Returns
    counts for the report: kills, runs, rows lost to kills (recomputed), worst loss.
    """
    rng = random.Random(seed)
    n, per_interval = CAPTURE["n_items"], CAPTURE["save_every"] * CAPTURE["batch_size"]
    n_batches = -(-n // CAPTURE["batch_size"])
    stats = {"kills": 0, "runs": 0, "rows_recomputed": 0, "worst_loss": 0, "chains": 0}
    while stats["kills"] < kills:
        stats["chains"] += 1
        case = tmp / f"chain{stats['chains']}"
        case.mkdir()
        out = case / "acts"
        in_chain = 0
        while True:
            before = done_rows(out)
            rows_log = case / f"rows{stats['runs']}.log"
            log = case / f"worker{stats['runs']}.log"
            proc = start(["capture", str(model_dir), str(out), str(rows_log)], log)
            stats["runs"] += 1
            if in_chain >= chain or stats["kills"] >= kills:
                finish(proc, log)
                assert sum(rows_logged(rows_log)) == n - before, "a resumed run redid done rows"
                break
            remaining = max(1, -(-(n - before) // CAPTURE["batch_size"]))
            target = rng.randint(1, min(remaining, n_batches))
            killed = kill_when(
                proc,
                lambda p=rows_log, t=target: len(rows_logged(p)) >= t,
                rng.uniform(0, 1.5 * CAPTURE["delay_s"]),
            )
            if not killed:
                finish(proc, log)
                break
            stats["kills"] += 1
            in_chain += 1
            # the final directory appears whole (by rename) or not at all
            if out.exists():
                assert_complete(out, reference)
                break
            after = done_rows(out)
            computed = sum(rows_logged(rows_log))
            lost = computed - (after - before)
            assert 0 <= lost <= per_interval, (
                f"kill {stats['kills']}: {lost} rows computed but not checkpointed "
                f"(limit {per_interval}: {CAPTURE['save_every']} batches)"
            )
            stats["rows_recomputed"] += lost
            stats["worst_loss"] = max(stats["worst_loss"], lost)
        assert_complete(out, reference)
        assert not out.with_name("acts.partial").exists()
    return stats


def test_capture_survives_sigkill_short(tiny_dirs, capture_reference, tmp_path) -> None:
    stats = kill_capture_repeatedly(
        tiny_dirs["llama"], capture_reference, tmp_path, kills=3, seed=1, chain=3
    )
    print(f"\ncapture kills (short): {stats}")
    assert stats["kills"] == 3


@pytest.mark.slow
def test_capture_survives_sigkill_long(tiny_dirs, capture_reference, tmp_path) -> None:
    stats = kill_capture_repeatedly(
        tiny_dirs["llama"], capture_reference, tmp_path, kills=24, seed=2, chain=4
    )
    print(f"\ncapture kills (long): {stats}")
    assert stats["kills"] == 24


class _RowCounter:
    """Counts rows through the first decoder layer of a model while installed."""

    def __init__(self, loaded: Any) -> None:
        self.rows = 0
        self._handle = loaded.layers[0].register_forward_hook(self._hook)

    def _hook(self, _module: Any, _inputs: Any, output: Any) -> None:
        self.rows += (output[0] if isinstance(output, tuple) else output).shape[0]

    def remove(self) -> None:
        self._handle.remove()


@pytest.mark.parametrize("drop", ["nothing", "progress", "progress+meta"])
def test_capture_killed_while_finishing_recomputes_nothing(
    tiny_models, capture_reference, tmp_path, drop: str
) -> None:
    # The states a kill between writing index.json and the final rename leaves behind.
    import shutil

    loaded = tiny_models["llama"]
    items = capture_items(CAPTURE["n_items"])
    work = tmp_path / "acts.partial"
    shutil.copytree(capture_reference, work)
    index = read_index(work)
    meta = {k: v for k, v in index.items() if k != "ids"}
    if drop == "nothing":
        np.save(work / PROGRESS_FILE, np.ones(len(items), dtype=bool))
    if drop != "progress+meta":
        (work / "meta.json").write_text(json.dumps(meta))
    counter = _RowCounter(loaded)
    try:
        out = capture_to_disk(
            loaded, items, CAPTURE["layers"], tmp_path / "acts", batch_size=4, progress=False
        )
    finally:
        counter.remove()
    assert counter.rows == 0
    assert_complete(out, capture_reference)
    assert not work.exists()


def test_capture_layer_file_torn_at_creation_is_rebuilt(
    tiny_models, capture_reference, tmp_path
) -> None:
    # A kill while the first layer file's header is being written leaves a torn file and no
    # progress: the re-run must rebuild it rather than fail on it.
    work = tmp_path / "acts.partial"
    work.mkdir()
    meta = {k: v for k, v in read_index(capture_reference).items() if k != "ids"}
    (work / "meta.json").write_text(json.dumps(meta))
    (work / layer_file(0)).write_bytes(b"\x93NUMPY\x01\x00")
    loaded = tiny_models["llama"]
    items = capture_items(CAPTURE["n_items"])
    out = capture_to_disk(loaded, items, CAPTURE["layers"], tmp_path / "acts", progress=False)
    assert_complete(out, capture_reference)


# ---------------------------------------------------------------- judge behind a faulty proxy

SUBJECTS = ["red", "blue", "seven", "green", "a table", "purple", "Tuesday", "orange", "a cat"]
KINDS = ["an animal", "a number", "a colour", "a city"]


def judge_prompts(n: int, n_doomed: int = 0) -> list[str]:
    """Return `n` distinct yes/no prompts plus `n_doomed` the proxy always fails."""
    out = []
    for i in range(n):
        x, y = SUBJECTS[i % len(SUBJECTS)], KINDS[(i // len(SUBJECTS)) % len(KINDS)]
        out.append(f"Question {i}: is {x} {y}? Answer Yes or No.")
    out += [f"{ALWAYS_FAIL_MARKER} doomed question {i}? Answer Yes or No." for i in range(n_doomed)]
    return out


def judge_cfg(base_url: str, cache_dir: Path | None, **kw: Any) -> JudgeConfig:
    """Return an openai-backend judge config with fast retries and a short timeout."""
    values: dict[str, Any] = {
        "backend": "openai",
        "base_url": base_url,
        "model": JUDGE_MODEL,
        "api_key_env": KEY_ENV,
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
        "max_retries": MAX_RETRIES,
        "timeout_s": TIMEOUT_S,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "max_tokens": 1,
        "max_concurrency": 3,
    }
    values.update(kw)
    return JudgeConfig(**values)


def prompt_key(prompt: str) -> str:
    """Return the judge cache key of a yes/no prompt (as the proxy computes it)."""
    messages = [{"role": "user", "content": prompt}]
    return cache_key("openai", JUDGE_MODEL, messages, 1, 0.0, TOP_LOGPROBS)


def paid(arrivals: list[Any]) -> int:
    """Return how many of the arrivals reached the upstream."""
    return sum(a.forwarded for a in arrivals)


def check_no_double_payment(
    state: ProxyState, mark: int = 0, skip: frozenset[str] = frozenset()
) -> dict[str, int]:
    """Fail when a key was asked again after an intact delivery; return fault counts.

    Keys in `skip` (prompts the proxy always fails) are checked but not counted.
    """
    faults: dict[str, int] = {}
    for key, arrivals in state.by_key(mark).items():
        actions = [a.action for a in arrivals]
        if "ok" in actions:
            assert actions.index("ok") == len(actions) - 1, f"{key[:8]} asked again: {actions}"
        for a in arrivals:
            assert a.forwarded == (a.action not in ("429", "500")), a
            if a.action != "ok" and key not in skip:
                faults[a.action] = faults.get(a.action, 0) + 1
    return faults


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set the fake API key the judge reads."""
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)


def run_faulty_judge(upstream: str, tmp: Path, n: int, seed: int) -> dict[str, Any]:
    """Judge `n` prompts (+2 doomed) through a 30% faulty proxy; check every guarantee."""
    prompts = judge_prompts(n, n_doomed=2)
    with fault_proxy(upstream, rate=0.3, seed=seed, hold_s=HOLD_S) as (url, state):
        judge = make_judge(judge_cfg(url, tmp / "cache"))
        verdicts = judge.yes_no(prompts)
        summary = judge.summary()
        seen = state.by_key()
        for p, v in zip(prompts, verdicts, strict=True):
            actions = [a.action for a in seen[prompt_key(p)]]
            assert v.status in ("ok", "unscorable", "failed"), v
            if v.status == "failed":
                # counted failed only once every allowed attempt was faulted
                assert "ok" not in actions and len(actions) == MAX_RETRIES + 1, (p, actions)
            else:
                assert actions[-1] == "ok" and actions.count("ok") == 1, (p, actions)
            if CLIENT_GONE not in actions:  # no slow upstream answer mistaken for a fault
                body = {"messages": [{"role": "user", "content": p}]}
                want = expected_outcome(state.plan, prompt_key(p), body, MAX_RETRIES)
                got = "failed" if v.status == "failed" else "ok"
                assert got == want, f"{p!r}: {v.status}; the plan says {want}; proxy saw {actions}"
        failed = {
            prompt_key(p) for p, v in zip(prompts, verdicts, strict=True) if v.status == "failed"
        }
        assert summary["items"] == len(prompts) and summary["failures"] == len(failed) >= 2
        doomed = frozenset(prompt_key(p) for p in prompts if ALWAYS_FAIL_MARKER in p)
        faults = check_no_double_payment(state, skip=doomed)
        arrivals = state.snapshot()
        # a second judge on the same cache (a later stage, another process) pays nothing more
        mark = state.mark()
        again = make_judge(judge_cfg(url, tmp / "cache"))
        repeat = again.yes_no(prompts)
        assert [v.status for v in repeat] == [v.status for v in verdicts]
        ok = [(a, b) for a, b in zip(repeat, verdicts, strict=True) if b.status != "failed"]
        assert all(a == b for a, b in ok)
        assert set(state.by_key(mark)) <= failed, "a cached answer was requested again"
        assert again.summary()["cache_hits"] == len(ok)
    return {
        "items": len(prompts),
        "requests": len(arrivals),
        "random_faults": faults,
        "random_faults_total": sum(faults.values()),
        "spurious_client_timeouts": faults.get(CLIENT_GONE, 0),
        "failed_items": len(failed),
        "paid_upstream": paid(arrivals),
        "retries": summary["retries"],
    }


def test_judge_absorbs_faults_short(warm_server, tmp_path, keyed) -> None:
    stats = run_faulty_judge(warm_server, tmp_path, n=16, seed=0)
    print(f"\njudge faults (short): {stats}")
    assert stats["random_faults_total"] >= 4


@pytest.mark.slow
def test_judge_absorbs_faults_long(warm_server, tmp_path, keyed) -> None:
    stats = run_faulty_judge(warm_server, tmp_path, n=120, seed=3)
    print(f"\njudge faults (long): {stats}")
    assert stats["random_faults_total"] >= 30


@pytest.mark.parametrize("cap", ["requests", "cost"])
def test_judge_budget_cap_holds_under_faults(warm_server, tmp_path, keyed, cap: str) -> None:
    prompts = judge_prompts(14)
    price = {"usd_per_1k_input_tokens": 1.0, "usd_per_1k_output_tokens": 1.0}
    limits = {"max_requests": 6} if cap == "requests" else {"max_cost_usd": 0.25, **price}
    with fault_proxy(warm_server, rate=0.3, seed=5, hold_s=HOLD_S) as (url, state):
        judge = make_judge(judge_cfg(url, tmp_path / "cache", **limits))
        verdicts = judge.yes_no(prompts)
        arrivals = state.snapshot()
    statuses = [v.status for v in verdicts]
    assert set(statuses) <= {"ok", "unscorable", "failed", "budget_exhausted"}
    assert "budget_exhausted" in statuses
    print(f"\nbudget ({cap}): {len(arrivals)} requests, {paid(arrivals)} paid, {statuses}")
    if cap == "requests":
        assert paid(arrivals) <= 6, f"{paid(arrivals)} paid requests under a cap of 6"
    else:
        spent = sum(a.prompt_tokens + a.completion_tokens for a in arrivals if a.forwarded) / 1000
        assert spent <= 0.25, f"upstream billed {spent:.4f} USD under a cap of 0.25"


def judge_worker(base_url: str, cache_dir: str, prompts_file: str, out: str) -> None:
    """Judge the prompts of a JSON file through `base_url`; write verdicts and summary."""
    prompts = json.loads(Path(prompts_file).read_text())
    judge = make_judge(judge_cfg(base_url, Path(cache_dir), max_concurrency=2))
    verdicts = judge.yes_no(prompts)
    result = {"statuses": [v.status for v in verdicts], "summary": judge.summary()}
    Path(out).write_text(json.dumps(result))


def cached_keys(cache_dir: Path) -> set[str]:
    """Return the keys of the entries in a judge cache directory."""
    return {p.stem for p in cache_dir.rglob("*.json") if len(p.stem) == 64}


def crash_and_rerun_judge(upstream: str, tmp: Path, n: int, seed: int, crashes: int) -> dict:
    """Kill judge workers midway `crashes` times; every re-run re-uses every cached answer."""
    rng = random.Random(seed)
    prompts = judge_prompts(n)
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    cache = tmp / "cache"
    args = ["judge", "", str(cache), str(tmp / "prompts.json"), str(tmp / "out.json")]
    reused = []
    with fault_proxy(upstream, rate=0.3, seed=seed, hold_s=HOLD_S) as (url, state):
        args[1] = url
        for k in range(crashes + 1):
            before = cached_keys(cache)
            mark = state.mark()
            log = tmp / f"judge{k}.log"
            proc = start(args, log)
            if k < crashes:
                room = (n - len(before)) // (crashes + 1 - k)
                target = len(before) + rng.randint(1, max(1, room))
                ready = lambda t=target: len(cached_keys(cache)) >= t  # noqa: E731
                assert kill_when(proc, ready, 0.0), "the judge finished before the kill"
            else:
                finish(proc, log)
            asked = set(state.by_key(mark))
            assert not asked & before, f"{len(asked & before)} cached answers requested again"
            reused.append(len(before))
        check_no_double_payment(state)
    result = json.loads((tmp / "out.json").read_text())
    assert set(result["statuses"]) <= {"ok", "unscorable"}
    assert result["summary"]["cache_hits"] == reused[-1]
    assert result["summary"]["requests"] == n - reused[-1]
    return {"crashes": crashes, "cached_before_each_rerun": reused[1:], "items": n}


def test_judge_crash_rerun_reuses_cache(warm_server, tmp_path) -> None:
    stats = crash_and_rerun_judge(warm_server, tmp_path, n=12, seed=7, crashes=1)
    print(f"\njudge crash/re-run (short): {stats}")


@pytest.mark.slow
def test_judge_crash_rerun_reuses_cache_long(warm_server, tmp_path) -> None:
    stats = crash_and_rerun_judge(warm_server, tmp_path, n=60, seed=8, crashes=5)
    print(f"\njudge crash/re-run (long): {stats}")


# ---------------------------------------------------------------- DVC never caches a partial output

DVC_FOUNDATION = {"n_prompts": 240, "layers": [0, 1, 2], "batch_size": 4, "seed": 0}
ACTS = "data/foundation/activations"
PROMPTS = "data/foundation/prompts.jsonl"


def dvc_env(repo: Path) -> dict[str, str]:
    """Return the environment `dvc repro` runs stages in for a temp repo."""
    env = worker_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(repo / "src")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def start_repro(repo: Path, log: Path, force: bool = False) -> subprocess.Popen[bytes]:
    """Start `dvc repro foundation_capture` in its own process group."""
    cmd = ["dvc", "repro", *(["--force"] if force else []), "foundation_capture"]
    with open(log, "ab") as fh:
        return subprocess.Popen(
            cmd,
            cwd=repo,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dvc_env(repo),
            start_new_session=True,
        )


def cache_files(repo: Path) -> list[Path]:
    """Return every object file in the repo's DVC cache."""
    root = repo / ".dvc" / "cache" / "files"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def whole_layer_file(path: Path) -> bool:
    """Return whether a layer file has every row written (a partial one has all-zero rows)."""
    values = np.load(path, allow_pickle=False)
    return values.shape[0] == DVC_FOUNDATION["n_prompts"] and bool(
        np.abs(values).sum(axis=1).min() > 0
    )


def check_cache_holds_only_whole_outputs(repo: Path) -> None:
    """Fail when any cached object is part of an unfinished output."""
    want = sorted([INDEX_FILE, *(layer_file(k) for k in DVC_FOUNDATION["layers"])])
    for p in cache_files(repo):
        if p.name.endswith(".dir"):
            names = sorted(e["relpath"] for e in json.loads(p.read_text()))
            assert names == want, f"cached directory listing {names}"
        elif p.read_bytes()[:6] == b"\x93NUMPY":
            assert whole_layer_file(p), f"{p}: cached layer file has unwritten rows"


def dvc_status(repo: Path) -> dict[str, Any]:
    """Return `dvc status --json` of foundation_capture."""
    proc = subprocess.run(
        ["dvc", "status", "--json", "foundation_capture"],
        cwd=repo,
        env=dvc_env(repo),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout or "{}")


def check_status_after_kill(repo: Path) -> None:
    """Fail when `dvc status` calls the stage up to date while its outputs are not whole."""
    if "foundation_capture" in dvc_status(repo):
        return
    acts, prompts = repo / ACTS, repo / PROMPTS
    assert acts.is_dir() and prompts.is_file(), "status is clean but an output is missing"
    assert all(whole_layer_file(acts / layer_file(k)) for k in DVC_FOUNDATION["layers"])
    assert len(prompts.read_text().splitlines()) == DVC_FOUNDATION["n_prompts"]


def reference_foundation(tiny_models, tmp: Path) -> Path:
    """Return activations computed in process on the prompts foundation_capture reads."""
    from llmlab.prompt_pool import general_prompt_pool

    pool = general_prompt_pool(DVC_FOUNDATION["n_prompts"], seed=DVC_FOUNDATION["seed"])
    items = [CaptureItem(p.id, [{"role": "user", "content": p.prompt}]) for p in pool]
    out = tmp / "reference_acts"
    layers = DVC_FOUNDATION["layers"]
    return capture_to_disk(tiny_models["llama"], items, layers, out, batch_size=32, progress=False)


@pytest.fixture
def foundation_repo(tiny_dirs, tmp_path) -> Path:
    """Return a temp DVC repo of the project on the tiny model, with a capture long enough."""
    from dvc_repo import make_repo

    return make_repo(tmp_path, tiny_dirs["llama"], overrides={"foundation": DVC_FOUNDATION})


def finish_repro_and_compare(repo: Path, tiny_models, log: Path) -> None:
    """Run `dvc repro` to the end; the outputs equal an uninterrupted computation."""
    finish(start_repro(repo, log), log)
    assert dvc_status(repo) == {}
    check_cache_holds_only_whole_outputs(repo)
    reference = reference_foundation(tiny_models, log.parent)
    acts = repo / ACTS
    assert not acts.with_name("activations.partial").exists()
    assert read_index(acts)["ids"] == read_index(reference)["ids"]
    for layer in DVC_FOUNDATION["layers"]:
        got = load_activations(acts, layer).values
        want = load_activations(reference, layer).values
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dvc_never_caches_partial_output_short(foundation_repo, tiny_models, tmp_path) -> None:
    repo = foundation_repo
    progress = repo / "data/foundation/activations.partial" / PROGRESS_FILE
    proc = start_repro(repo, tmp_path / "killed.log")
    assert kill_when(proc, progress.is_file, 0.0), "dvc repro finished before the kill"
    assert progress.is_file(), "the kill should leave a checkpoint to resume from"
    assert not cache_files(repo), "a killed stage left objects in the DVC cache"
    assert "foundation_capture" in dvc_status(repo)
    finish_repro_and_compare(repo, tiny_models, tmp_path / "rerun.log")


@pytest.mark.slow
def test_dvc_never_caches_partial_output_long(foundation_repo, tiny_models, tmp_path) -> None:
    # Kill at random times over whole forced re-runs: DVC start-up, model load, capture, commit.
    repo = foundation_repo
    rng = random.Random(11)
    t0 = time.monotonic()
    finish(start_repro(repo, tmp_path / "first.log"), tmp_path / "first.log")
    full_s = time.monotonic() - t0
    kills = 0
    for k in range(8):
        proc = start_repro(repo, tmp_path / f"kill{k}.log", force=True)
        started, delay = time.monotonic(), rng.uniform(0.1, 1.0) * full_s
        kills += kill_when(proc, lambda s=started, d=delay: time.monotonic() - s >= d, 0.0)
        check_cache_holds_only_whole_outputs(repo)
        check_status_after_kill(repo)
    finish_repro_and_compare(repo, tiny_models, tmp_path / "final.log")
    print(f"\ndvc repro kills: {kills} of 8 attempts (uninterrupted run {full_s:.1f}s)")
    assert kills >= 5


# ---------------------------------------------------------------- worker entry point

if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "capture":
        capture_worker(*rest)
    elif mode == "judge":
        judge_worker(*rest)
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")
