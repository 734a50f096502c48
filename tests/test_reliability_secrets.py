"""Secrets stay out of everything a run writes; models and data load without running code.

The scan test runs the foundation pipeline with `dvc repro` (and, in the slow version, a
`dvc exp run`) in a git + DVC repository, plus a judge stage against the loopback server, all
with fake API keys in the environment and debug logging on, then searches every file the run
wrote, the git history, the captured output and `dvc exp show` for the keys.
This file is also the judge stage it runs: `python tests/test_reliability_secrets.py judge ...`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:  # run as a stage script
    sys.path.insert(0, str(TESTS))

JUDGE_MODEL = "smollm2-135m"
CUSTOM_KEY_ENV = "LLMLAB_JUDGE_API_KEY"
# `model: null` (the top-level model): dvc.yaml declares `foundation.model` a stage param.
FOUNDATION = {"model": None, "n_prompts": 24, "layers": [0.5, -1], "batch_size": 12, "seed": 0}


# ---------------------------------------------------------------- the judge stage


def judge_stage(base_url: str, dead_url: str, out: str) -> None:
    """Judge a few prompts through `base_url` (and one through a dead port); write a summary."""
    from llmlab.io import write_json
    from llmlab.judge import JudgeConfig, make_judge
    from llmlab.stage import run_stage

    def main() -> None:
        common = {"backend": "openai", "model": JUDGE_MODEL}  # the per-user cache
        judge = make_judge(JudgeConfig(base_url=base_url, max_tokens=2, **common))
        verdicts = judge.yes_no(["Is red a colour? Answer Yes or No.", "Is 7 even? Yes or No."])
        # a second judge reads its key from a custom variable and fails: error paths log too
        dead = make_judge(
            JudgeConfig(
                base_url=dead_url, api_key_env=CUSTOM_KEY_ENV, max_retries=1,
                backoff_base_s=0.01, timeout_s=2, **common,
            )
        )  # fmt: skip
        failed = dead.yes_no(["Is blue a colour?"])
        write_json(
            out,
            {
                "verdicts": [v.__dict__ for v in verdicts],
                "failed": [v.__dict__ for v in failed],
                "summary": judge.summary(),
                "dead_summary": dead.summary(),
            },
        )

    run_stage(main, gpus=0)


# ---------------------------------------------------------------- the run to scan


def fake_keys() -> dict[str, str]:
    """Return fake secrets, unique per run, for every place a credential may come from."""
    t = [secrets.token_hex(12) for _ in range(4)]
    return {
        "OPENAI_API_KEY": f"sk-test-SECRET-{t[0]}",
        CUSTOM_KEY_ENV: f"sk-custom-SECRET-{t[1]}",
        "HF_TOKEN": f"hf_SECRET{t[2]}",
        "AWS_SECRET_ACCESS_KEY": f"aws-SECRET-{t[3].upper()}",
    }


def run_env(repo: Path, home: Path, keys: dict[str, str]) -> dict[str, str]:
    """Return the environment of the run: the keys, debug logs, isolated git and DVC config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_"))}
    env.update(keys)
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(repo / "src"),
            "HF_HUB_OFFLINE": "1",
            "LLMLAB_LOG": "DEBUG",
            "OPENAI_LOG": "debug",
            "COLUMNS": "400",  # dvc exp show prints every column instead of eliding them
            "LLMLAB_GPUS_PER_STAGE": "0",
            "OMP_NUM_THREADS": "1",
            "LLMLAB_CACHE": str(home / "llmlab-cache"),  # the judge cache is scanned too
            "DVC_NO_ANALYTICS": "1",
            "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"),
            "DVC_SYSTEM_CONFIG_DIR": str(home / "dvc-system"),
            "GIT_CONFIG_GLOBAL": str(home / "gitconfig"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "llmlab tests",
            "GIT_AUTHOR_EMAIL": "tests@llmlab.invalid",
            "GIT_COMMITTER_NAME": "llmlab tests",
            "GIT_COMMITTER_EMAIL": "tests@llmlab.invalid",
        }
    )
    return env


class Run:
    """Commands run in the scanned repository, with every output kept for the scan."""

    def __init__(self, repo: Path, env: dict[str, str], logs: Path) -> None:
        self.repo, self.env, self.logs = repo, env, logs
        logs.mkdir()
        self.n = 0

    def __call__(self, *cmd: str, timeout: float = 600) -> str:
        """Run a command, save its stdout and stderr, and return stdout; fail on error."""
        proc = subprocess.run(
            list(cmd), cwd=self.repo, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        self.n += 1
        name = re.sub(r"[^\w.-]+", "_", " ".join(cmd[:3]))[:60]
        (self.logs / f"{self.n:02d}-{name}.out").write_text(proc.stdout)
        (self.logs / f"{self.n:02d}-{name}.err").write_text(proc.stderr)
        if proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )
        return proc.stdout


def make_repo(repo: Path, model_dir: Path, run: Run) -> None:
    """Create a git + DVC repository holding the project's code and its foundation pipeline."""
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data/prompts", repo / "data/prompts")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = {k: v for k, v in spec["stages"].items() if k.startswith("foundation_")}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = {k: params[k] for k in ("model", "seed", "models", "runtime", "judge")}
    params["models"]["tiny"] = {"source": "local", "path": str(model_dir), "chat": True}
    params["model"] = "tiny"
    params["runtime"] = {"device": "cpu", "dtype": "float32", "attn_implementation": "eager"}
    params["foundation"] = FOUNDATION
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "init", "-q", "-b", "main")
    run("dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "pipeline")


def scan(roots: list[Path], keys: dict[str, str], extra: dict[str, str]) -> dict[str, Any]:
    """Return where any key (or its random core) appears, and how much was scanned."""
    needles = {name: key.encode() for name, key in keys.items()}
    # the random part alone too: a key split, masked at its ends or re-quoted still leaks it
    needles |= {
        f"{name} core": key.split("SECRET")[-1].strip("-").encode() for name, key in keys.items()
    }
    hits: list[str] = []
    n_files = n_bytes = 0
    for root in roots:
        for p in [root] if root.is_file() else root.rglob("*"):
            if not p.is_file() or p.is_symlink():
                continue
            data = p.read_bytes()
            n_files += 1
            n_bytes += len(data)
            hits += [f"{p}: {name}" for name, needle in needles.items() if needle in data]
    for label, text in extra.items():
        n_bytes += len(text)
        hits += [f"{label}: {name}" for name, n in needles.items() if n.decode() in text]
    return {"hits": hits, "files": n_files, "bytes": n_bytes, "texts": len(extra)}


def git_history(run: Run) -> str:
    """Return every committed file's content over all refs (experiments included), as text."""
    revs = run("git", "rev-list", "--all").split()
    return run("git", "log", "--all", "-p", "--binary") + "\n".join(
        run("git", "show", "--stat", "-p", rev) for rev in revs
    )


@pytest.fixture(scope="module")
def server() -> str:
    """Return the URL of the shared loopback llama-cpp server (skip when it cannot run)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: install llama-cpp-python[server]")
    from fault_proxy import shared_judge_server

    from llmlab.judge.judge import TOP_LOGPROBS

    try:
        return shared_judge_server(JUDGE_MODEL, TOP_LOGPROBS)
    except RuntimeError as e:
        pytest.skip(str(e))


def run_and_scan(tiny_dirs, server: str, tmp_path: Path, experiment: bool) -> dict[str, Any]:
    """Run the pipeline, the judge stage and `dvc exp show` with keys set; scan everything."""
    from judge_server import free_port

    keys = fake_keys()
    repo, home = tmp_path / "repo", tmp_path / "home"
    repo.mkdir()
    home.mkdir()
    run = Run(repo, run_env(repo, home, keys), tmp_path / "logs")
    make_repo(repo, tiny_dirs["llama"], run)
    run("dvc", "repro")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    run(sys.executable, str(Path(__file__).resolve()), "judge", server, dead, "metrics/judge.json")
    result = json.loads((repo / "metrics/judge.json").read_text())
    assert [v["status"] for v in result["verdicts"]] != ["failed", "failed"]
    assert result["failed"][0]["status"] == "failed"
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "foundation run")
    if experiment:
        run("dvc", "exp", "run", "-S", "foundation.seed=1")
    shown = {
        "dvc exp show": run("dvc", "exp", "show", "--no-pager"),
        "dvc exp show --json": run("dvc", "exp", "show", "--json"),
        "git history": git_history(run),
    }
    assert "best_probe_accuracy" in shown["dvc exp show --json"]
    written = [repo, run.logs, home / "llmlab-cache"]
    found = scan(written, keys, shown)
    assert (home / "llmlab-cache/judge").is_dir() and (repo / "dvc.lock").is_file()
    assert not found["hits"], "secret found in:\n" + "\n".join(found["hits"])
    return found | {"commands": run.n, "keys": len(keys)}


def test_no_secret_in_anything_a_run_writes(tiny_dirs, server, tmp_path) -> None:
    found = run_and_scan(tiny_dirs, server, tmp_path, experiment=False)
    print(f"\nsecrets scan: {found}")


@pytest.mark.slow
def test_no_secret_in_anything_a_run_writes_with_experiment(tiny_dirs, server, tmp_path) -> None:
    found = run_and_scan(tiny_dirs, server, tmp_path, experiment=True)
    print(f"\nsecrets scan (with dvc exp run): {found}")


def test_scanner_finds_a_planted_key(tmp_path) -> None:
    # The scan must be able to fail: plant each kind of leak and expect it to be reported.
    keys = fake_keys()
    (tmp_path / "plain.log").write_text(f"Authorization: Bearer {keys['OPENAI_API_KEY']}\n")
    masked = keys[CUSTOM_KEY_ENV].split("SECRET")[-1]
    (tmp_path / "masked.json").write_text(json.dumps({"key": "sk-...SECRET" + masked}))
    found = scan([tmp_path], keys, {"exp show": f"x {keys['HF_TOKEN']} y"})
    assert len(found["hits"]) >= 4


# ---------------------------------------------------------------- model and data loading


@pytest.mark.parametrize("allow", [None, True])
def test_trust_remote_code_only_when_params_ask(tiny_dirs, monkeypatch, allow) -> None:
    import transformers
    from conftest import make_params

    from llmlab.models import load_model

    calls: dict[str, list[dict[str, Any]]] = {"model": [], "tokenizer": []}
    for name, cls in (
        ("model", transformers.AutoModelForCausalLM),
        ("tokenizer", transformers.AutoTokenizer),
    ):
        original = cls.from_pretrained

        def record(*a: Any, _orig: Any = original, _name: str = name, **kw: Any) -> Any:
            calls[_name].append(kw)
            return _orig(*a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", record)
    params = make_params(tiny_dirs["llama"])
    if allow:
        params.runtime.trust_remote_code = True
    load_model(params)
    assert calls["model"] and calls["tokenizer"]
    for kw in calls["model"] + calls["tokenizer"]:
        assert kw.get("trust_remote_code") is bool(allow)
    # local weights load as safetensors only (no pickle-based .bin fallback)
    assert all(kw.get("use_safetensors") is True for kw in calls["model"])


def test_trust_remote_code_is_off_in_defaults_and_project_params() -> None:
    from llmlab.params import Runtime, load_params

    assert Runtime().trust_remote_code is False
    assert load_params(ROOT / "params.yaml").runtime.trust_remote_code is False


PICKLE_MODULES = ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve")


def _unsafe_calls(path: Path, root: Path = ROOT) -> list[str]:
    """Return the unsafe deserialisation calls in one source file, as 'file:line: what'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + ([] if node.module != "torch" else names)
            if any(n.split(".")[0] in PICKLE_MODULES for n in names) or "load" in names:
                found.append(f"{where}: imports {', '.join(names)}")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        if func == "torch.load":
            wo = kwargs.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        if func.split(".")[-1] in ("read_pickle", "load_pickle"):
            found.append(f"{where}: {func}")
        for name in ("allow_pickle", "trust_remote_code"):
            v = kwargs.get(name)
            if isinstance(v, ast.Constant) and v.value is True:
                found.append(f"{where}: {name}=True")
    return found


def test_no_pickle_or_unsafe_torch_load_in_src() -> None:
    files = sorted((ROOT / "src").rglob("*.py"))
    assert len(files) > 20
    problems = [p for f in files for p in _unsafe_calls(f)]
    # a plain grep as a second net, for anything the syntax check misses
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), start=1):
            code = line.split("#")[0]
            if re.search(r"\bpickle\.loads?\(|\btorch\.load\((?!.*weights_only=True)", code):
                problems.append(f"{f.relative_to(ROOT)}:{n}: {code.strip()}")
    assert not problems, "\n".join(problems)


def test_unsafe_call_check_catches_examples(tmp_path) -> None:
    bad = tmp_path / "example.py"
    bad.write_text(
        "import pickle\nimport torch\nimport numpy as np\nimport pandas as pd\n"
        "from torch import load\n"
        "a = torch.load('x.pt')\nb = torch.load('x.pt', weights_only=False)\n"
        "c = np.load('x.npy', allow_pickle=True)\nd = pickle.load(open('x', 'rb'))\n"
        "e = f(trust_remote_code=True)\nf = pd.read_pickle('x')\n"
        "ok = torch.load('x.pt', weights_only=True)\nok2 = np.load('x.npy')\n"
    )
    found = _unsafe_calls(bad, tmp_path)
    # pickle import, torch load import, two torch.load, allow_pickle, trust_remote_code, read_pickle
    assert len(found) == 7, found


def test_project_remote_config_holds_no_credentials() -> None:
    # Credentials belong in .dvc/config.local (git-ignored) or the environment, never in git.
    config = (ROOT / ".dvc/config").read_text()
    for option in ("access_key_id", "secret_access_key", "session_token", "password", "token"):
        assert not re.search(rf"^\s*{option}\s*=", config, re.M), option
    assert "/config.local" in (ROOT / ".dvc/.gitignore").read_text().split()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "judge":
        judge_stage(*sys.argv[2:])
    else:
        raise SystemExit("usage: test_reliability_secrets.py judge BASE_URL DEAD_URL OUT")
