"""GPU assignment for stage processes: per-GPU lock files, so parallel queue workers never share a GPU.

`dvc queue start -j N` runs N experiments at once, each stage as its own process. Before a stage's
main() runs, `claim_gpus()` takes an exclusive `flock` on one lock file per GPU it needs (trying
the GPUs in order without blocking, then waiting with backoff while all are busy) and makes only
those GPUs visible through CUDA_VISIBLE_DEVICES. The kernel drops an flock when the last file
descriptor on it closes, so a lock is released when its process ends in any way, SIGKILL and
out-of-memory kills included; there is no stale-lock cleanup to get wrong.

Environment:
    LLMLAB_GPUS_PER_STAGE  GPUs each stage takes (default 1; 0 = take no lock and see every GPU,
                           for `accelerate launch` or device_map=auto runs that want them all).
    LLMLAB_LOCK_DIR        directory of the lock files (default
                           ~/.cache/llmlab/gpu-locks/<hostname>; the hostname keeps machines that
                           share a home directory from locking each other's GPUs).
    LLMLAB_FAKE_GPUS       pretend the machine has this many GPUs (tests on CPU machines).

Nothing happens when no GPU is found or when CUDA_VISIBLE_DEVICES is already set (the user, or
a parent stage process, has chosen the devices). GPUs are counted with `nvidia-smi -L` (or the
driver's /proc entries) rather than through torch, because the CUDA runtime reads
CUDA_VISIBLE_DEVICES once, at initialisation: counting through torch first would fix the
visible set before it could be narrowed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("llmlab.gpu")

ENV_PER_STAGE = "LLMLAB_GPUS_PER_STAGE"
ENV_LOCK_DIR = "LLMLAB_LOCK_DIR"
ENV_FAKE = "LLMLAB_FAKE_GPUS"

_GPU_LINE = re.compile(r"^GPU (\d+):.*\(UUID: (GPU-[^)]+)\)")
_MIG_LINE = re.compile(r"^\s+MIG .*\(UUID: (MIG-[^)]+)\)")


class GpuConfigError(ValueError):
    """An LLMLAB_* GPU setting is invalid or cannot be met on this machine."""


@dataclass(frozen=True)
class Gpu:
    """One lockable device: what CUDA_VISIBLE_DEVICES names it by, and its lock file's stem."""

    cuda_id: str
    lock_name: str


@dataclass
class HeldLock:
    """A lock this process holds; the open descriptor is what keeps the flock alive."""

    gpu: Gpu
    path: Path
    fd: int


# Module-level so the descriptors (and with them the locks) live as long as the process.
_held: list[HeldLock] = []


def parse_nvidia_smi(listing: str) -> list[Gpu]:
    """Return the devices in `nvidia-smi -L` output; a MIG-enabled GPU yields its MIG instances."""
    gpus: list[Gpu] = []
    current: tuple[int, str] | None = None
    migs: list[str] = []

    def flush() -> None:
        if current is None:
            return
        index, _uuid = current
        if migs:
            gpus.extend(Gpu(m, f"gpu{index}-mig{k}") for k, m in enumerate(migs))
        else:
            gpus.append(Gpu(str(index), f"gpu{index}"))

    for line in listing.splitlines():
        if m := _GPU_LINE.match(line):
            flush()
            current, migs = (int(m.group(1)), m.group(2)), []
        elif (m := _MIG_LINE.match(line)) and current is not None:
            migs.append(m.group(1))
    flush()
    return gpus


def machine_gpus() -> list[Gpu]:
    """Return this machine's GPUs, found without initialising CUDA (empty when there are none)."""
    fake = os.environ.get(ENV_FAKE)
    if fake is not None:
        try:
            n = int(fake)
        except ValueError:
            raise GpuConfigError(f"{ENV_FAKE}={fake!r}: expected a whole number") from None
        return [Gpu(str(i), f"gpu{i}") for i in range(max(n, 0))]
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            out = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=30, check=False
            )
            if out.returncode == 0:
                return parse_nvidia_smi(out.stdout)
            log.debug("nvidia-smi -L failed (%d): %s", out.returncode, out.stderr.strip())
        except (OSError, subprocess.TimeoutExpired) as e:
            log.debug("nvidia-smi -L failed: %s", e)
    # The driver lists one directory per GPU, named by PCI address; sorted, that is the
    # PCI-bus order that nvidia-smi indices follow too.
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return [Gpu(str(i), f"gpu{i}") for i, _ in enumerate(sorted(proc.iterdir()))]
    return []


def gpus_per_stage() -> int:
    """Return how many GPUs a stage takes, from LLMLAB_GPUS_PER_STAGE (default 1)."""
    raw = os.environ.get(ENV_PER_STAGE, "1").strip()
    try:
        n = int(raw)
    except ValueError:
        raise GpuConfigError(f"{ENV_PER_STAGE}={raw!r}: expected a whole number >= 0") from None
    if n < 0:
        raise GpuConfigError(f"{ENV_PER_STAGE}={raw!r}: expected a whole number >= 0")
    return n


def lock_dir() -> Path:
    """Return the directory holding the per-GPU lock files (created if missing)."""
    raw = os.environ.get(ENV_LOCK_DIR)
    if raw:
        path = Path(raw).expanduser()
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        path = cache / "llmlab" / "gpu-locks" / socket.gethostname()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GpuConfigError(f"{ENV_LOCK_DIR}: cannot create {path}: {e.strerror}") from None
    return path


def _holder_note() -> str:
    """Return the line written into a lock file to say who holds it."""
    cmd = " ".join([Path(sys.executable).name, *sys.argv])[:300]
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    return f"pid={os.getpid()} host={socket.gethostname()} since={started} cmd={cmd}\n"


def try_lock(gpu: Gpu, directory: Path) -> HeldLock | None:
    """Return the held lock on `gpu`, or None at once when another process holds it."""
    path = directory / f"{gpu.lock_name}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        writable = True
    except PermissionError:
        # flock needs no write access: a lock dir shared between users still works read-only.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        writable = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if writable:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_note().encode(), 0)
    return HeldLock(gpu, path, fd)


def _holders(gpus: list[Gpu], directory: Path) -> str:
    """Return a short description of who holds each GPU, read from the lock files."""
    parts = []
    for gpu in gpus:
        try:
            note = (directory / f"{gpu.lock_name}.lock").read_text().strip()
        except OSError:
            note = ""
        pid = re.search(r"pid=(\d+)", note)
        parts.append(f"{gpu.lock_name}: pid {pid.group(1)}" if pid else gpu.lock_name)
    return ", ".join(parts)


def _release(locks: list[HeldLock]) -> None:
    for held in locks:
        os.close(held.fd)


def acquire(
    n: int,
    gpus: list[Gpu],
    directory: Path,
    first_delay: float = 0.5,
    max_delay: float = 10.0,
    report_every: float = 600.0,
) -> list[HeldLock]:
    """Return locks on `n` of `gpus`, waiting (with backoff) until that many are free at once."""
    if n > len(gpus):
        raise GpuConfigError(f"{ENV_PER_STAGE}={n} but this machine has {len(gpus)} GPU(s) to lock")
    delay, waited, last_report = first_delay, 0.0, None
    while True:
        got: list[HeldLock] = []
        for gpu in gpus:
            held = try_lock(gpu, directory)
            if held is not None:
                got.append(held)
                if len(got) == n:
                    if waited:
                        log.info("GPU lock free after %.0f s of waiting", waited)
                    return got
        # Holding a partial set while waiting could deadlock two multi-GPU stages.
        _release(got)
        if last_report is None or waited - last_report >= report_every:
            log.info(
                "all GPUs busy (need %d of %d; %s); waiting for one to free (locks in %s)",
                n,
                len(gpus),
                _holders(gpus, directory),
                directory,
            )
            last_report = waited
        # Jitter keeps workers that started together from polling in lockstep.
        pause = delay * random.uniform(0.8, 1.2)
        time.sleep(pause)
        waited += pause
        delay = min(delay * 2, max_delay)


def held_gpus() -> list[str]:
    """Return the CUDA ids of the GPUs this process holds locks on."""
    return [h.gpu.cuda_id for h in _held]


def release_gpus() -> None:
    """Release every GPU lock this process holds (process exit does the same)."""
    _release(_held)
    _held.clear()


def claim_gpus(n: int | None = None) -> list[str]:
    """Return the GPU ids this process locked and made its only visible ones ([] when none).

    `n` overrides LLMLAB_GPUS_PER_STAGE. Call before anything initialises CUDA.
    """
    if _held:
        return held_gpus()
    n = gpus_per_stage() if n is None else n
    if n == 0:
        return []
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        log.debug("CUDA_VISIBLE_DEVICES already set; taking no GPU lock")
        return []
    gpus = machine_gpus()
    if not gpus:
        return []
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning(
            "CUDA was initialised before the GPU lock; the locked GPU may not be the one used"
        )
    directory = lock_dir()
    _held.extend(acquire(n, gpus, directory))
    ids = held_gpus()
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    # nvidia-smi numbers GPUs in PCI-bus order; CUDA's default order can differ.
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    log.info("using GPU %s (lock %s)", ",".join(ids), ", ".join(str(h.path) for h in _held))
    return ids
