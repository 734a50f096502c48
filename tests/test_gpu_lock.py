"""GPU locks for parallel stage processes, on simulated GPUs (LLMLAB_FAKE_GPUS) and real processes."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmlab import gpu
from llmlab.stage import HINT

# A stage entry point that reports the GPUs it was given, then holds them until stdin closes.
HOLDER = """
import os, sys
from llmlab.stage import run_stage

def main():
    print("device=" + os.environ.get("CUDA_VISIBLE_DEVICES", "none"), flush=True)
    sys.stdin.read()

run_stage(main)
"""

# The same on real GPUs, also reporting what CUDA then sees as cuda:0.
REAL_HOLDER = """
import os, sys
from llmlab.stage import run_stage

def main():
    line = "device=" + os.environ.get("CUDA_VISIBLE_DEVICES", "none")
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        uuid = str(torch.cuda.get_device_properties(0).uuid)
        line += f" count={torch.cuda.device_count()} uuid={uuid}"
    print(line, flush=True)
    sys.stdin.read()

run_stage(main)
"""

SMI_LISTING = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaaaaaa-0000-0000-0000-000000000000)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-bbbbbbbb-0000-0000-0000-000000000000)
  MIG 3g.20gb     Device  0: (UUID: MIG-cccccccc-0000-0000-0000-000000000000)
  MIG 3g.20gb     Device  1: (UUID: MIG-dddddddd-0000-0000-0000-000000000000)
GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-eeeeeeee-0000-0000-0000-000000000000)
"""


def env_for(lock_dir: Path, n_gpus: int | None = 4, **extra: str) -> dict[str, str]:
    """Return a subprocess environment simulating `n_gpus` GPUs with locks in `lock_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMLAB_", "CUDA_"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    env["LLMLAB_LOCK_DIR"] = str(lock_dir)
    if n_gpus is not None:
        env["LLMLAB_FAKE_GPUS"] = str(n_gpus)
    env.update(extra)
    return env


def _pump(stream, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


class Holder:
    """A holder process; reader threads collect its stdout and stderr lines as they come."""

    def __init__(self, env: dict[str, str], script: str = HOLDER) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=_pump, args=(stream, lines), daemon=True).start()

    @staticmethod
    def wait_for(lines: queue.Queue[str], needle: str, timeout: float = 20.0) -> list[str]:
        """Return the lines up to and including the first containing `needle`."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                seen.append(lines.get(timeout=left))
            except queue.Empty:
                break
            if needle in seen[-1]:
                return seen
        raise AssertionError(f"no line with {needle!r} within {timeout} s; got {seen!r}")

    def device(self, timeout: float = 20.0) -> str:
        """Return the CUDA_VISIBLE_DEVICES the holder's stage saw."""
        return self.wait_for(self.out, "device=", timeout)[-1].removeprefix("device=")

    def still_waiting(self, seconds: float) -> bool:
        """Return True if the holder is running and reported no device for `seconds`."""
        try:
            self.out.get(timeout=seconds)
        except queue.Empty:
            return self.proc.poll() is None
        return False

    def finish(self) -> int:
        """Return the exit code after letting the holder's stage end normally."""
        self.proc.stdin.close()
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        """SIGKILL the holder and reap it."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def procs():
    running: list[Holder] = []
    yield running
    for holder in running:
        holder.stop()


def test_parallel_holders_never_share_a_gpu(tmp_path: Path, procs) -> None:
    env = env_for(tmp_path, 4)
    procs.extend(Holder(env) for _ in range(4))
    devices = [h.device() for h in procs]
    assert sorted(devices) == ["0", "1", "2", "3"]
    # Each lock file names its holder (read by the "all busy" log line).
    for h, device in zip(procs, devices, strict=True):
        assert (tmp_path / f"gpu{device}.lock").read_text().startswith(f"pid={h.pid} ")


def test_sigkilled_holder_frees_its_gpu_at_once(tmp_path: Path, procs) -> None:
    env = env_for(tmp_path, 3)
    procs.extend(Holder(env) for _ in range(3))
    devices = [h.device() for h in procs]
    procs[1].kill()
    late = Holder(env)
    procs.append(late)
    # No waiting: the kernel dropped the dead process's flock.
    assert late.device(timeout=10) == devices[1]
    log = late.wait_for(late.err, "using GPU")
    assert not any("busy" in line for line in log)


def test_waits_while_all_gpus_are_busy(tmp_path: Path, procs) -> None:
    env = env_for(tmp_path, 2)
    procs.extend(Holder(env) for _ in range(2))
    devices = [h.device() for h in procs]
    waiter = Holder(env)
    procs.append(waiter)
    line = waiter.wait_for(waiter.err, "all GPUs busy")[-1]
    assert "need 1 of 2" in line and f"pid {procs[0].pid}" in line
    assert waiter.still_waiting(1.0)
    assert procs[0].finish() == 0  # the first holder's stage ends normally
    assert waiter.device(timeout=20) == devices[0]
    assert waiter.wait_for(waiter.err, "GPU lock free after")


def test_multi_gpu_stages_take_disjoint_sets(tmp_path: Path, procs) -> None:
    env = env_for(tmp_path, 4, LLMLAB_GPUS_PER_STAGE="2")
    procs.extend(Holder(env) for _ in range(2))
    sets = [set(h.device().split(",")) for h in procs]
    assert all(len(s) == 2 for s in sets)
    assert sets[0].isdisjoint(sets[1]) and sets[0] | sets[1] == {"0", "1", "2", "3"}
    third = Holder(env)
    procs.append(third)
    third.wait_for(third.err, "need 2 of 4")
    procs[1].kill()
    assert set(third.device().split(",")) == sets[1]


@pytest.mark.parametrize(
    ("extra", "n_gpus"),
    [
        ({"LLMLAB_GPUS_PER_STAGE": "0"}, 4),  # e.g. accelerate launch: sees every GPU
        ({"CUDA_VISIBLE_DEVICES": "3"}, 4),  # the user chose the device
        ({}, 0),  # no GPU on this machine
    ],
)
def test_no_lock_taken(tmp_path: Path, procs, extra: dict[str, str], n_gpus: int) -> None:
    env = env_for(tmp_path, n_gpus, **extra)
    procs.append(Holder(env))
    assert procs[0].device() == extra.get("CUDA_VISIBLE_DEVICES", "none")
    assert not list(tmp_path.glob("*.lock"))


def test_bad_setting_fails_the_stage_in_one_line(tmp_path: Path) -> None:
    env = env_for(tmp_path, 4, LLMLAB_GPUS_PER_STAGE="two")
    proc = subprocess.run(
        [sys.executable, "-c", HOLDER], env=env, input="", capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: LLMLAB_GPUS_PER_STAGE='two': expected a whole number >= 0; {HINT}"
    ]


@pytest.mark.parametrize(
    ("per_stage", "fake", "message"),
    [
        ("-1", "4", "LLMLAB_GPUS_PER_STAGE='-1': expected a whole number >= 0"),
        ("5", "4", "LLMLAB_GPUS_PER_STAGE=5 but this machine has 4 GPU(s) to lock"),
        ("1", "four", "LLMLAB_FAKE_GPUS='four': expected a whole number"),
    ],
)
def test_bad_settings_are_named(
    tmp_path: Path, monkeypatch, per_stage: str, fake: str, message: str
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("LLMLAB_GPUS_PER_STAGE", per_stage)
    monkeypatch.setenv("LLMLAB_FAKE_GPUS", fake)
    monkeypatch.setenv("LLMLAB_LOCK_DIR", str(tmp_path))
    with pytest.raises(gpu.GpuConfigError) as err:
        gpu.claim_gpus()
    assert str(err.value) == message
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_parse_nvidia_smi_listing() -> None:
    gpus = gpu.parse_nvidia_smi(SMI_LISTING)
    assert [g.cuda_id for g in gpus] == [
        "0",
        "MIG-cccccccc-0000-0000-0000-000000000000",
        "MIG-dddddddd-0000-0000-0000-000000000000",
        "2",
    ]
    assert [g.lock_name for g in gpus] == ["gpu0", "gpu1-mig0", "gpu1-mig1", "gpu2"]
    assert gpu.parse_nvidia_smi("No devices were found\n") == []


def test_claim_in_process_sets_visible_devices(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.setenv("LLMLAB_FAKE_GPUS", "2")
    monkeypatch.setenv("LLMLAB_LOCK_DIR", str(tmp_path))
    try:
        assert gpu.claim_gpus() == ["0"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert gpu.claim_gpus() == ["0"]  # idempotent within a process
        other = gpu.try_lock(gpu.Gpu("0", "gpu0"), tmp_path)
        assert other is None  # a second descriptor cannot take a held flock
    finally:
        gpu.release_gpus()
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        os.environ.pop("CUDA_DEVICE_ORDER", None)
    again = gpu.try_lock(gpu.Gpu("0", "gpu0"), tmp_path)
    assert again is not None
    os.close(again.fd)


def real_gpu_listing() -> str:
    """Return `nvidia-smi -L` output, or "" on a machine without NVIDIA GPUs."""
    try:
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


REAL_LISTING = real_gpu_listing()


@pytest.mark.skipif(not gpu.parse_nvidia_smi(REAL_LISTING), reason="needs real NVIDIA GPUs")
def test_real_gpus_one_stage_each_and_cuda0_is_the_locked_gpu(tmp_path: Path, procs) -> None:
    gpus = gpu.parse_nvidia_smi(REAL_LISTING)
    uuids = dict(re.findall(r"^GPU (\d+): .*\(UUID: GPU-([^)]+)\)", REAL_LISTING, re.M))
    env = env_for(tmp_path, None)
    procs.extend(Holder(env, REAL_HOLDER) for _ in gpus)
    seen = [
        dict(kv.split("=", 1) for kv in h.wait_for(h.out, "device=", 180)[-1].split())
        for h in procs
    ]
    assert sorted(s["device"] for s in seen) == sorted(g.cuda_id for g in gpus)
    for s in seen:
        if "uuid" in s:  # torch with CUDA: the stage sees exactly its GPU, as cuda:0
            assert s["count"] == "1"
            assert s["uuid"].removeprefix("GPU-") == uuids[s["device"]]
    # One more stage waits while every GPU is held, and gets the GPU of a SIGKILLed one.
    waiter = Holder(env, REAL_HOLDER)
    procs.append(waiter)
    waiter.wait_for(waiter.err, "all GPUs busy", 60)
    procs[0].kill()
    line = waiter.wait_for(waiter.out, "device=", 60)[-1]
    assert line.split()[0] == f"device={seen[0]['device']}"
