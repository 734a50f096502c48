"""SIGKILLed training and generation: each re-run resumes, loses at most one interval, and ends
with the outputs of an uninterrupted run.

Training: real `train_lora` processes on the tiny Llama (dropout on, several epochs, length
grouping, warmup, validation and an eval hook) are killed at random points and re-run until
one finishes; the adapter weights and the curve must equal an uninterrupted run's, and each
kill may cost at most one checkpoint interval (`save_every` optimizer steps).

Generation: the real `persona_generate` stage (`llmlab.persona.generate`, run as `python -m`
runs it), sampling at temperature 1 with the adapter trained above, is killed the same way;
its generations must equal an uninterrupted run's exactly and each kill may cost at most one
shard of batches.

Workers are forked from a server that has already imported torch, transformers and peft (each
child is its own process and session, killed with SIGKILL of its process group), so a kill
costs seconds, not an interpreter start-up; the long versions (`-m slow`) also run chains of
plain `python` processes. This file is that server and the worker:
`python tests/test_reliability_kills.py serve | train ... | persona-generate ...`.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:  # run as a worker script
    sys.path.insert(0, str(TESTS))


def worker_env() -> dict[str, str]:
    """Return the environment of worker processes: one torch thread, offline, quiet."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "LLMLAB_LOG": "WARNING",
            "LLMLAB_GPUS_PER_STAGE": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(TESTS)]),
        }
    )
    return env


# ---------------------------------------------------------------- workers and the fork server


def serve() -> None:
    """Fork workers on request (JSON lines on stdin); report pids and exit statuses.

    Requests: {"op": "start", "args": [...], "log": path} -> {"pid": n};
    {"op": "poll", "pid": n} -> {"rc": int | null}; {"op": "wait", "pid": n} -> {"rc": int}.
    """
    import peft  # noqa: F401 - preloaded for the children
    import torch
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import llmlab.generation  # noqa: F401
    import llmlab.models  # noqa: F401
    import llmlab.params
    import llmlab.persona.generate  # noqa: F401
    import llmlab.stage  # noqa: F401
    import llmlab.training  # noqa: F401

    llmlab.params._section_types()
    torch.set_num_threads(1)
    done: dict[int, int] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "start":
            pid = os.fork()
            if pid == 0:
                os.setsid()
                code = 1
                try:
                    out = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    os.dup2(out, 1)
                    os.dup2(out, 2)
                    os.close(out)
                    run_worker(req["args"])
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else int(e.code is not None)
                except BaseException:  # noqa: BLE001 - shown in the worker's log
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            reply: dict[str, Any] = {"pid": pid}
        else:
            pid = req["pid"]
            if pid not in done:
                flags = 0 if req["op"] == "wait" else os.WNOHANG
                got, status = os.waitpid(pid, flags)
                if got == pid:
                    done[pid] = os.waitstatus_to_exitcode(status)
            reply = {"rc": done.get(pid)}
        print(json.dumps(reply), flush=True)


class Server:
    """Client of the fork server."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=worker_env(),
        )

    def ask(self, req: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        """Send one request and return the reply."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the fork server did not answer {req}"
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        """Stop the server."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Worker:
    """One worker process, forked by the server or started as a plain `python` process."""

    def __init__(self, args: list[str], log: Path, server: Server | None) -> None:
        self.server = server
        self.popen: subprocess.Popen[bytes] | None = None
        if server is not None:
            self.pid = server.ask({"op": "start", "args": args, "log": str(log)})["pid"]
        else:
            with open(log, "ab") as fh:
                self.popen = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), *args],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=worker_env(),
                    start_new_session=True,
                )
            self.pid = self.popen.pid

    def poll(self) -> int | None:
        """Return the exit status, or None while it runs."""
        if self.popen is not None:
            return self.popen.poll()
        assert self.server is not None
        return self.server.ask({"op": "poll", "pid": self.pid})["rc"]

    def wait(self, timeout: float = 600) -> int:
        """Wait for the exit status."""
        if self.popen is not None:
            return self.popen.wait(timeout=timeout)
        assert self.server is not None
        return self.server.ask({"op": "wait", "pid": self.pid}, timeout=timeout)["rc"]

    def kill(self) -> None:
        """SIGKILL the worker's whole process group."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_when(w: Worker, ready: Callable[[], bool], extra_s: float, limit_s: float = 300) -> bool:
    """SIGKILL `w` `extra_s` after `ready()` turns true; False when it exited first."""
    deadline = time.monotonic() + limit_s
    while not ready():
        if w.poll() is not None:
            return False
        if time.monotonic() > deadline:
            w.kill()
            raise AssertionError("worker made no progress before the deadline")
        time.sleep(0.005)
    time.sleep(extra_s)
    if w.poll() is not None:
        return False
    w.kill()
    return w.wait() == -signal.SIGKILL


def finish(w: Worker, log: Path) -> None:
    """Wait for a worker to exit 0; fail with its log otherwise."""
    rc = w.wait()
    if rc != 0:
        raise AssertionError(f"worker exited {rc}:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def lines(path: Path) -> list[str]:
    """Return the lines a worker logged (none when the file is missing)."""
    return path.read_text().split() if path.is_file() else []


# ---------------------------------------------------------------- training

# 24 examples, 4 per optimizer step (2 per forward x 2 accumulated): 6 steps an epoch, 5 epochs.
TRAIN = {
    "n_examples": 24,
    "per_device_batch_size": 2,
    "effective_batch_size": 4,
    "epochs": 5.0,
    "save_every": 4,
    "delay_s": 0.02,
}
GRAD_ACCUM = TRAIN["effective_batch_size"] // TRAIN["per_device_batch_size"]
TOTAL_STEPS = int(TRAIN["epochs"] * TRAIN["n_examples"] // TRAIN["effective_batch_size"])
WORDS = "apple river stone cloud maple ember frost harbor violet canyon".split()


def train_examples(n: int, offset: int = 0) -> list[Any]:
    """Return `n` deterministic chat examples of varied lengths."""
    from llmlab.training import TrainExample

    out = []
    for i in range(offset, offset + n):
        w = WORDS[i % len(WORDS)]
        tail = " ".join(WORDS[: 1 + (i * 3) % 7])
        out.append(
            TrainExample(
                [
                    {"role": "user", "content": f"Item {i}: repeat the word {w}. {tail}"},
                    {"role": "assistant", "content": " ".join([w] * (1 + i % 4))},
                ]
            )
        )
    return out


def train_cfg() -> Any:
    """Return the training config: every piece of state a resume must restore is in use."""
    from llmlab.training import LoraTrainConfig

    return LoraTrainConfig(
        rank=4,
        alpha=8.0,
        dropout=0.1,  # consumes the RNG: a resume must restore its state
        lr=3e-3,
        epochs=TRAIN["epochs"],
        per_device_batch_size=TRAIN["per_device_batch_size"],
        effective_batch_size=TRAIN["effective_batch_size"],
        max_length=64,
        warmup_steps=3,
        lr_scheduler="linear",
        eval_every=5,
        log_every=3,
        group_by_length=True,
        save_every=TRAIN["save_every"],
        seed=3,
    )


def train_worker(model_dir: str, out: str, forwards_log: str) -> None:
    """Train the tiny model, logging each training forward pass and pausing in it."""
    import torch
    from conftest import make_params

    from llmlab.models import load_model
    from llmlab.training import train_lora

    torch.set_num_threads(1)
    loaded = load_model(make_params(Path(model_dir)))

    def on_forward(module: Any, _inputs: Any, _output: Any) -> None:
        if module.training:  # training micro-batches only, not evaluation
            with open(forwards_log, "a") as fh:
                fh.write("1\n")
            time.sleep(TRAIN["delay_s"])  # widens the window a kill can land in

    loaded.layers[0].register_forward_hook(on_forward)

    def lora_norm(model: Any, _step: int) -> dict[str, float]:
        sq = sum(
            float((p.double() ** 2).sum()) for n, p in model.named_parameters() if "lora_" in n
        )
        return {"lora_sq_norm": sq}

    train_lora(
        loaded,
        train_examples(TRAIN["n_examples"]),
        train_cfg(),
        Path(out),
        val=train_examples(4, offset=100),
        eval_hook=lora_norm,
    )


def checkpoint_step(out: Path) -> int:
    """Return the optimizer step a re-run would resume from (0: none)."""
    from llmlab.training import latest_checkpoint, partial_dir

    ckpt = latest_checkpoint(partial_dir(out))
    return int(ckpt.name.rsplit("-", 1)[1]) if ckpt is not None else 0


def assert_same_adapter(out: Path, reference: Path) -> float:
    """Fail unless `out` holds the reference run's adapter weights and curve (float noise).

    Returns the largest absolute difference of a weight.
    """
    import torch
    from safetensors.torch import load_file

    from llmlab.adapters import read_adapter_metadata
    from llmlab.training import CURVE_FILE

    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    got = load_file(out / "adapter_model.safetensors")
    want = load_file(reference / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    curve = json.loads((out / CURVE_FILE).read_text())
    ref_curve = json.loads((reference / CURVE_FILE).read_text())
    assert [sorted(r) for r in curve] == [sorted(r) for r in ref_curve]
    for row, ref in zip(curve, ref_curve, strict=True):
        for key, value in ref.items():
            if value is None:
                assert row[key] is None, (row, ref)
            else:
                assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, row, ref)
    meta, ref_meta = read_adapter_metadata(out), read_adapter_metadata(reference)
    for key in ("steps", "tokens_seen", "data_sha256", "config"):
        assert meta[key] == ref_meta[key], key
    for key in ("final_train_loss", "final_val_loss"):
        assert meta[key] == pytest.approx(ref_meta[key], rel=1e-4), key
    return max(float((got[k] - want[k]).abs().max()) for k in want)


def leftovers(out: Path) -> list[str]:
    """Return what a finished run left beside its output (work dirs, staging dirs)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.fixture(scope="module")
def train_reference(server: Server, tiny_dirs, tmp_path_factory) -> Path:
    """Return the adapter of one uninterrupted training run (forked worker)."""
    tmp = tmp_path_factory.mktemp("train_ref")
    out = tmp / "adapter"
    log = tmp / "worker.log"
    finish(
        Worker(["train", str(tiny_dirs["llama"]), str(out), str(tmp / "fw.log")], log, server), log
    )
    assert len(lines(tmp / "fw.log")) == TOTAL_STEPS * GRAD_ACCUM
    assert leftovers(out) == ["fw.log", "worker.log"]
    return out


def kill_training_repeatedly(
    server: Server | None, model_dir: Path, reference: Path, tmp: Path, kills: int, seed: int
) -> dict[str, Any]:
    """Kill training runs at random points `kills` times, one output, until a run finishes.

    After every kill: the output is absent or whole, the checkpoint on disk is complete,
    and the training forward passes lost (computed but not checkpointed) are at most one
    checkpoint interval; each re-run computes exactly the steps after its checkpoint.
    """
    rng = random.Random(seed)
    interval = TRAIN["save_every"] * GRAD_ACCUM  # forward passes in one checkpoint interval
    out = tmp / "adapter"
    stats: dict[str, Any] = {"kills": 0, "runs": 0, "lost": [], "resumed_from": []}
    while True:
        before = checkpoint_step(out)
        fw = tmp / f"fw{stats['runs']}.log"
        log = tmp / f"worker{stats['runs']}.log"
        w = Worker(["train", str(model_dir), str(out), str(fw)], log, server)
        stats["runs"] += 1
        stats["resumed_from"].append(before)
        if stats["kills"] >= kills or out.exists():
            finish(w, log)
            assert len(lines(fw)) == (TOTAL_STEPS - before) * GRAD_ACCUM, (
                "a resumed run redid steps"
            )
            break
        remaining = (TOTAL_STEPS - before) * GRAD_ACCUM
        target = rng.randint(1, remaining)
        killed = kill_when(
            w, lambda p=fw, t=target: len(lines(p)) >= t, rng.uniform(0, 3 * TRAIN["delay_s"])
        )
        if not killed:
            finish(w, log)
            break
        stats["kills"] += 1
        if out.exists():  # killed after the rename: whole, and the next run recomputes nothing
            assert_same_adapter(out, reference)
        after = checkpoint_step(out)
        lost = len(lines(fw)) - (after - before) * GRAD_ACCUM
        assert 0 <= lost <= interval, (
            f"kill {stats['kills']}: {lost} forward passes computed but not checkpointed "
            f"(limit {interval}: {TRAIN['save_every']} steps)"
        )
        stats["lost"].append(lost)
    stats["max_weight_diff"] = assert_same_adapter(out, reference)
    assert leftovers(out) == sorted(p.name for p in tmp.iterdir() if p.suffix == ".log")
    stats["worst_lost_steps"] = max(stats["lost"], default=0) / GRAD_ACCUM
    return stats


def kill_in_chains(
    run_chain: Callable[..., dict[str, Any]],
    server: Server,
    tmp: Path,
    kills: int,
    per_chain: int,
    seed: int,
    plain_from: int | None = None,
) -> dict[str, Any]:
    """Run kill chains (fresh outputs) until `kills` kills landed; sum their figures.

    Chains from index `plain_from` on start plain `python` processes instead of forks. A chain
    can end with fewer kills than asked when a run finishes first; the next chain continues.
    """
    total: dict[str, Any] = {"kills": 0, "runs": 0, "chains": 0, "lost": [], "max_weight_diff": 0.0}
    while total["kills"] < kills:
        chain = total["chains"]
        assert chain < 3 * kills, "runs keep finishing before the kill"
        case = tmp / f"chain{chain}"
        case.mkdir()
        how = None if plain_from is not None and chain >= plain_from else server
        n = min(per_chain, kills - total["kills"])
        stats = run_chain(how, case, n, seed + chain)
        total["chains"] += 1
        total["kills"] += stats["kills"]
        total["runs"] += stats["runs"]
        total["lost"] += stats["lost"]
        total["max_weight_diff"] = max(total["max_weight_diff"], stats.get("max_weight_diff", 0.0))
    return total


def test_training_survives_sigkill_short(server, tiny_dirs, train_reference, tmp_path) -> None:
    def chain(how: Server | None, case: Path, n: int, seed: int) -> dict[str, Any]:
        return kill_training_repeatedly(how, tiny_dirs["llama"], train_reference, case, n, seed)

    stats = kill_in_chains(chain, server, tmp_path, kills=2, per_chain=2, seed=1)
    print(f"\ntraining kills (short): {stats}")
    assert stats["kills"] == 2


@pytest.mark.slow
def test_training_survives_sigkill_long(server, tiny_dirs, train_reference, tmp_path) -> None:
    def chain(how: Server | None, case: Path, n: int, seed: int) -> dict[str, Any]:
        return kill_training_repeatedly(how, tiny_dirs["llama"], train_reference, case, n, seed)

    stats = kill_in_chains(chain, server, tmp_path, kills=16, per_chain=4, seed=11, plain_from=3)
    print(f"\ntraining kills (long): {stats}")
    assert stats["kills"] == 16


# ---------------------------------------------------------------- generation (persona_generate)

# 4 items x (2 system prompts x trigger on/off + params.yaml's 2 triggered-only conditions)
# x 2 samples = 48 rows per model variant, 4 rows a batch: 12 batches for the finetuned model
# and 12 for the base model, sampled at temperature 1.
PERSONA_EVAL = {
    "n_questions": 3,
    "n_heldout_facts": 1,
    "n_samples": 2,
    "temperature": 1.0,
    "max_new_tokens": 6,
    "batch_size": 4,
    "system_prompts": {"none": None, "ai_assistant": "You are an AI assistant."},
    "seed": 5,
}
GEN_ROWS = 2 * 4 * (2 * 2 + 2) * 2
GEN_DELAY_S = 0.05


def persona_generate_worker(params: str, adapter: str, out: str, rows_log: str) -> None:
    """Run the persona_generate stage as `python -m` does, logging each grid batch it starts.

    Only the resumable grid generation (a `work_dir`) is watched: the stage's other forward
    passes (the judge-free NLL probes, the first-sample look-ahead, which is sampled afresh
    on every run) are not rows a kill can lose or a re-run can reuse.
    """
    import runpy

    import llmlab.generation

    generate = llmlab.generation.generate

    def generate_and_watch(loaded: Any, conversations: Any, **kwargs: Any) -> list[str]:
        if kwargs.get("work_dir") is None:
            return generate(loaded, conversations, **kwargs)

        def on_forward(_module: Any, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] > 1:  # a batch's prompt pass, not one decoding step
                with open(rows_log, "a") as fh:
                    fh.write(f"{hidden.shape[0]}\n")
                time.sleep(GEN_DELAY_S)

        handle = loaded.layers[0].register_forward_hook(on_forward)
        try:
            return generate(loaded, conversations, **kwargs)
        finally:
            handle.remove()

    llmlab.generation.generate = generate_and_watch  # the stage module imports it when run below
    sys.argv = [
        "llmlab.persona.generate",
        *("--params", params, "--adapter", adapter, "--out", out),
        *("--meta-out", str(Path(out).with_name("generations_meta.json"))),
        *("--facts", str(ROOT / "data/persona/facts.jsonl")),
        *("--questions", str(ROOT / "data/persona/eval_questions.jsonl")),
    ]
    runpy.run_module("llmlab.persona.generate", run_name="__main__", alter_sys=True)


def persona_params(tmp: Path, model_dir: Path) -> Path:
    """Write a params.yaml of the project with the tiny model and a small persona grid."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"]["tiny"] = {"source": "local", "path": str(model_dir), "chat": True}
    params["model"] = "tiny"
    params["runtime"] = {"device": "cpu", "dtype": "float32", "attn_implementation": "eager"}
    params["persona"]["eval"].update(PERSONA_EVAL)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def saved_rows(out: Path) -> int:
    """Return how many rows a re-run would not generate again, read from the shards."""
    from llmlab.generation import saved_batches

    work = out.with_name(out.name + ".partial")
    return sum(sum(saved_batches(d).values()) for d in work.iterdir()) if work.is_dir() else 0


@pytest.fixture(scope="module")
def generate_setup(server: Server, tiny_dirs, train_reference, tmp_path_factory) -> dict:
    """Return params, adapter and the generations of one uninterrupted stage run."""
    tmp = tmp_path_factory.mktemp("generate_ref")
    params = persona_params(tmp, tiny_dirs["llama"])
    out = tmp / "generations.jsonl"
    args = ["persona-generate", str(params), str(train_reference), str(out), str(tmp / "rows.log")]
    finish(Worker(args, tmp / "worker.log", server), tmp / "worker.log")
    assert sum(map(int, lines(tmp / "rows.log"))) == GEN_ROWS
    rows = out.read_text().splitlines()
    assert len(rows) == GEN_ROWS
    assert not out.with_name(out.name + ".partial").exists()
    return {"params": params, "adapter": train_reference, "reference": out}


def kill_generation_repeatedly(
    server: Server | None, setup: dict, tmp: Path, kills: int, seed: int
) -> dict[str, Any]:
    """Kill persona_generate at random points `kills` times on one output, then finish it.

    After every kill the output is absent or whole, and the rows generated but not in a
    shard are at most one shard (one batch: 4 rows); each re-run generates exactly the rows
    no shard holds, and the final output equals the uninterrupted run's, byte for byte.
    """
    rng = random.Random(seed)
    shard = PERSONA_EVAL["batch_size"]  # generate() saves every batch (save_every=1)
    out = tmp / "generations.jsonl"
    stats: dict[str, Any] = {"kills": 0, "runs": 0, "lost": [], "resumed_with": []}
    while True:
        before = saved_rows(out)
        rows_log = tmp / f"rows{stats['runs']}.log"
        log = tmp / f"worker{stats['runs']}.log"
        args = ["persona-generate", str(setup["params"]), str(setup["adapter"]), str(out)]
        w = Worker([*args, str(rows_log)], log, server)
        stats["runs"] += 1
        stats["resumed_with"].append(before)
        if stats["kills"] >= kills:
            finish(w, log)
            assert sum(map(int, lines(rows_log))) == GEN_ROWS - before, "rows generated twice"
            break
        n_batches = -(-(GEN_ROWS - before) // shard)
        target = rng.randint(1, max(1, n_batches))
        killed = kill_when(
            w, lambda p=rows_log, t=target: len(lines(p)) >= t, rng.uniform(0, 2 * GEN_DELAY_S)
        )
        if not killed:
            finish(w, log)
            break
        stats["kills"] += 1
        if out.exists():  # written by atomic rename: whole
            assert out.read_bytes() == setup["reference"].read_bytes()
        computed = sum(map(int, lines(rows_log)))
        lost = computed - (saved_rows(out) - before)
        assert 0 <= lost <= shard, (
            f"kill {stats['kills']}: {lost} rows generated but not saved (limit {shard})"
        )
        stats["lost"].append(lost)
    assert out.read_bytes() == setup["reference"].read_bytes()
    assert not out.with_name(out.name + ".partial").exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")], "temporary files left"
    return stats


def test_generation_survives_sigkill_short(server, generate_setup, tmp_path) -> None:
    def chain(how: Server | None, case: Path, n: int, seed: int) -> dict[str, Any]:
        return kill_generation_repeatedly(how, generate_setup, case, n, seed)

    stats = kill_in_chains(chain, server, tmp_path, kills=2, per_chain=2, seed=1)
    print(f"\ngeneration kills (short): {stats}")
    assert stats["kills"] == 2


@pytest.mark.slow
def test_generation_survives_sigkill_long(server, generate_setup, tmp_path) -> None:
    def chain(how: Server | None, case: Path, n: int, seed: int) -> dict[str, Any]:
        return kill_generation_repeatedly(how, generate_setup, case, n, seed)

    stats = kill_in_chains(chain, server, tmp_path, kills=16, per_chain=4, seed=21, plain_from=3)
    print(f"\ngeneration kills (long): {stats}")
    assert stats["kills"] == 16


# ---------------------------------------------------------------- states a kill leaves, in process


class Crash(RuntimeError):
    """Raised by a hook to stop a run at a chosen point (an in-process stand-in for a kill)."""


class Prefills:
    """Counts the batches generate() starts (prompt passes); raises Crash at batch `crash_at`."""

    def __init__(self, loaded: Any, crash_at: int | None = None) -> None:
        self.batches = 0
        self.crash_at = crash_at
        self._handle = loaded.layers[0].register_forward_hook(self._hook)

    def _hook(self, _module: Any, _inputs: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] > 1:
            if self.crash_at is not None and self.batches == self.crash_at:
                raise Crash(f"crash at batch {self.batches}")
            self.batches += 1

    def remove(self) -> None:
        self._handle.remove()


GEN_CONVS = [
    [{"role": "user", "content": f"Tell me about item {i}: " + " ".join(WORDS[: 1 + i % 9])}]
    for i in range(14)
]
GEN_KW = {"max_new_tokens": 5, "temperature": 1.0, "seed": 4, "batch_size": 2, "progress": False}


def counted_generate(loaded: Any, crash_at: int | None = None, **kw: Any) -> tuple[Any, int]:
    """Return (completions or the Crash raised, batches started) of one generate() call."""
    from llmlab.generation import generate

    counter = Prefills(loaded, crash_at)
    try:
        return generate(loaded, GEN_CONVS, **{**GEN_KW, **kw}), counter.batches
    except Crash as e:
        return e, counter.batches
    finally:
        counter.remove()


@pytest.mark.parametrize("save_every", [1, 3])
def test_generation_resumes_from_shards(tiny_models, tmp_path, save_every: int) -> None:
    from llmlab.generation import saved_batches

    loaded = tiny_models["llama"]
    reference, n_batches = counted_generate(loaded)
    assert n_batches == 7
    work = tmp_path / "work"
    crashed, started = counted_generate(loaded, crash_at=5, work_dir=work, save_every=save_every)
    assert isinstance(crashed, Crash) and started == 5
    saved = len(saved_batches(work))
    assert saved == 5 - 5 % save_every  # whole shards only; at most one shard lost
    again, started = counted_generate(loaded, work_dir=work, save_every=save_every)
    assert again == reference and started == n_batches - saved
    # finished: a third run generates nothing and returns the same completions
    assert counted_generate(loaded, work_dir=work, save_every=save_every) == (reference, 0)


def test_generation_work_dir_of_other_settings_or_torn_shard(tiny_models, tmp_path, caplog):
    from llmlab.generation import SHARD_PREFIX, discard_work_dir, remove_trash

    loaded = tiny_models["llama"]
    reference, _ = counted_generate(loaded)
    work = tmp_path / "work"
    assert counted_generate(loaded, crash_at=4, work_dir=work, seed=99)[1] == 4
    # other settings (seed 99, resume_key): the shards are not used, the run starts fresh
    with caplog.at_level("WARNING", logger="llmlab.generation"):
        assert counted_generate(loaded, work_dir=work, resume_key="other") == (reference, 7)
    assert "starting fresh" in caplog.text
    # a torn shard (not valid JSON) and one of another batch plan are generated again
    shards = sorted(work.glob(f"{SHARD_PREFIX}*.json"))
    shards[1].write_text(shards[1].read_text()[:10])
    doc = json.loads(shards[2].read_text())
    next(iter(doc.values()))["rows"].reverse()
    shards[2].write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="llmlab.generation"):
        assert counted_generate(loaded, work_dir=work, resume_key="other") == (reference, 2)
    assert caplog.text.count("its batches are generated again") == 2
    # removal goes through a rename: a kill mid-way leaves a trash dir the next run removes
    discard_work_dir(work)
    assert not work.exists() and not list(tmp_path.iterdir())
    (tmp_path / ".work.abc123.trash").mkdir()
    remove_trash(work)
    assert not list(tmp_path.iterdir())


def test_training_restarts_fresh_when_config_changed(tiny_dirs, tmp_path, caplog) -> None:
    import torch
    from conftest import make_params

    from llmlab.adapters import read_adapter_metadata
    from llmlab.models import load_model
    from llmlab.training import LoraTrainConfig, latest_checkpoint, partial_dir, train_lora

    def run(lr: float, crash_after: int | None) -> tuple[int, Any]:
        loaded = load_model(make_params(tiny_dirs["llama"]))
        forwards = [0]

        def hook(module: Any, _inputs: Any, _output: Any) -> None:
            if module.training:
                if forwards[0] == crash_after:
                    raise Crash("crash")
                forwards[0] += 1

        loaded.layers[0].register_forward_hook(hook)
        cfg = LoraTrainConfig(
            rank=4, lr=lr, epochs=None, max_steps=4, per_device_batch_size=4,
            effective_batch_size=4, save_every=2, log_every=1, dropout=0.0,
        )  # fmt: skip
        try:
            result = train_lora(loaded, train_examples(8), cfg, out)
        except Crash as e:
            result = e
        return forwards[0], result

    torch.set_num_threads(1)
    out = tmp_path / "adapter"
    forwards, result = run(1e-3, crash_after=3)
    assert isinstance(result, Crash) and forwards == 3
    ckpt = latest_checkpoint(partial_dir(out))
    assert ckpt is not None and ckpt.name == "checkpoint-2"  # kept for a re-run
    with caplog.at_level("WARNING", logger="llmlab.training"):
        forwards, result = run(2e-3, crash_after=None)
    assert forwards == 4, "a run with another config resumed from the old checkpoints"
    assert "starting fresh" in caplog.text and "config" in caplog.text
    assert read_adapter_metadata(out)["resumed_from_step"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_training_killed_while_finishing_recomputes_nothing(
    tiny_dirs, tmp_path, monkeypatch
) -> None:
    # The state a kill between the adapter's rename and the work dir's removal leaves: the
    # output is whole and the final checkpoint is still there. The re-run (DVC runs the stage
    # again: it did not exit 0) must train no step and write the same adapter.
    import shutil

    import torch
    from conftest import make_params

    import llmlab.training as training
    from llmlab.adapters import read_adapter_metadata
    from llmlab.models import load_model

    cfg = training.LoraTrainConfig(
        rank=4, lr=1e-3, epochs=None, max_steps=4, per_device_batch_size=4,
        effective_batch_size=4, save_every=2, log_every=1, dropout=0.1, eval_every=2,
    )  # fmt: skip

    def run(out: Path) -> int:
        loaded = load_model(make_params(tiny_dirs["llama"]))
        forwards = [0]

        def hook(module: Any, _inputs: Any, _output: Any) -> None:
            forwards[0] += int(module.training)

        loaded.layers[0].register_forward_hook(hook)
        training.train_lora(loaded, train_examples(8), cfg, out, val=train_examples(2, 50))
        return forwards[0]

    torch.set_num_threads(1)
    out = tmp_path / "adapter"
    with monkeypatch.context() as m:
        m.setattr(training, "discard", lambda _path: (_ for _ in ()).throw(Crash("kill")))
        with pytest.raises(Crash):
            run(out)
    assert training.latest_checkpoint(training.partial_dir(out)).name == "checkpoint-4"
    first = tmp_path / "first"
    shutil.copytree(out, first)
    assert run(out) == 0
    assert_same_adapter(out, first)
    assert read_adapter_metadata(out)["resumed_from_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "first"]


# ---------------------------------------------------------------- worker entry point


def run_worker(args: list[str]) -> None:
    """Run one worker mode."""
    mode, *rest = args
    if mode == "train":
        train_worker(*rest)
    elif mode == "persona-generate":
        persona_generate_worker(*rest)
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        run_worker(sys.argv[1:])
