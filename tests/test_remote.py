"""DVC remote storage against a real S3 API (moto on loopback): push, clone, pull, reproduce nothing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from hashlib import md5
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "llmlab-test"
REGION = "us-east-1"


def free_port() -> int:
    """Return a loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth(endpoint: str, free_requests: str) -> urllib.request.Request:
    """Return the moto request that checks signatures after `free_requests` more requests."""
    return urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=free_requests.encode(),
        headers={"Content-Type": "text/plain"},
    )


@pytest.fixture(scope="module")
def s3():
    """Yield {endpoint, key, secret} of a moto S3 server that checks request signatures."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Authentication is off until reset-auth: set up the user, its key and the bucket first.
    boot = {"endpoint_url": endpoint, "region_name": REGION}
    boot |= {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    iam = boto3.client("iam", **boot)
    iam.create_user(UserName="researcher")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(
        UserName="researcher", PolicyName="s3-all", PolicyDocument=json.dumps(policy)
    )
    key = iam.create_access_key(UserName="researcher")["AccessKey"]
    boto3.client("s3", **boot).create_bucket(Bucket=BUCKET)
    previous = json.loads(urllib.request.urlopen(auth(endpoint, "0")).read())
    yield {"endpoint": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    # moto's auth switch and backends are process-wide: leave them as they were.
    urllib.request.urlopen(auth(endpoint, previous["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]))
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
    server.stop()


def base_env(repo: Path, home: Path) -> dict[str, str]:
    """Return an environment isolated from the user's AWS, DVC and git configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_", "LLMLAB_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(repo / "src")
    env["HF_HUB_OFFLINE"] = "1"
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_GLOBAL_CONFIG_DIR"] = str(home / "dvc-global")
    env["DVC_SYSTEM_CONFIG_DIR"] = str(home / "dvc-system")
    env["AWS_CONFIG_FILE"] = str(home / "aws-config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(home / "aws-credentials")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env["AWS_MAX_ATTEMPTS"] = "2"
    env["GIT_CONFIG_GLOBAL"] = str(home / "gitconfig")
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"] = "llmlab tests"
        env[f"GIT_{role}_EMAIL"] = "tests@llmlab.invalid"
    return env


def sh(
    cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command; on an unexpected failure raise with its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def foundation_pipeline() -> dict:
    """Return the project's dvc.yaml restricted to the foundation stages and their plots."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = {k: v for k, v in spec["stages"].items() if k.startswith("foundation_")}
    plots = [
        p
        for p in spec.get("plots", [])
        if all(str(f).startswith("plots/foundation/") for f in next(iter(p.values()))["y"])
    ]
    return {"stages": stages, "plots": plots}


def make_git_repo(repo: Path, model_dir: Path, env: dict[str, str]) -> None:
    """Create a git + DVC repository holding the project's code and foundation pipeline."""
    repo.mkdir()
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "prompts", repo / "data" / "prompts")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(foundation_pipeline(), sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"] = {"tiny": {"source": "local", "path": str(model_dir), "chat": True}}
    params["model"] = "tiny"
    params["runtime"] = {"device": "cpu", "dtype": "float32", "attn_implementation": "eager"}
    params["foundation"] = {
        "model": None,
        "n_prompts": 40,
        "layers": [0.5, -1],
        "batch_size": 20,
        "seed": 0,
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(["dvc", "init", "-q"], repo, env)


@pytest.fixture(scope="module")
def origin(s3, tiny_dirs, tmp_path_factory):
    """Return (repo, home) of a repository whose pipeline ran and was pushed to the S3 remote."""
    home = tmp_path_factory.mktemp("home")
    repo = tmp_path_factory.mktemp("origin") / "repo"
    env = base_env(repo, home)
    make_git_repo(repo, tiny_dirs["llama"], env)
    sh(["dvc", "remote", "add", "-d", "s3", f"s3://{BUCKET}/store"], repo, env)
    sh(["dvc", "remote", "modify", "s3", "endpointurl", s3["endpoint"]], repo, env)
    sh(["dvc", "remote", "modify", "--local", "s3", "access_key_id", s3["key"]], repo, env)
    sh(["dvc", "remote", "modify", "--local", "s3", "secret_access_key", s3["secret"]], repo, env)
    sh(["dvc", "repro"], repo, env, timeout=900)  # minutes on a loaded 2-core machine
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-q", "-m", "foundation run"], repo, env)
    sh(["dvc", "push", "--run-cache"], repo, env)
    return repo, home


def clone_of(origin: Path, dest: Path, env: dict[str, str], **local: str) -> Path:
    """Return a fresh git clone of `origin` with `local` set in its remote's --local config."""
    sh(["git", "clone", "-q", str(origin), str(dest)], dest.parent, env)
    for option, value in local.items():
        sh(["dvc", "remote", "modify", "--local", "s3", option, value], dest, env)
    return dest


def status(repo: Path, env: dict[str, str]) -> dict:
    """Return `dvc status --json` of the whole pipeline."""
    return json.loads(sh(["dvc", "status", "--json"], repo, env).stdout or "{}")


def test_clone_pull_then_nothing_to_reproduce(origin, s3, tmp_path: Path) -> None:
    repo, home = origin
    env = base_env(tmp_path / "clone", home)
    creds = {"access_key_id": s3["key"], "secret_access_key": s3["secret"]}
    clone = clone_of(repo, tmp_path / "clone", env, **creds)

    # The project's pull (`make pull`) names the remote, then one `dvc pull --run-cache`.
    pulled = sh([sys.executable, "-m", "llmlab.pull"], clone, env)
    assert f"pulling from DVC remote 's3' (s3://{BUCKET}/store)" in pulled.stdout
    for path in ("data/foundation/prompts.jsonl", "data/foundation/activations/index.json"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert any((clone / ".dvc/cache/runs").rglob("*")), "run cache was not pulled"
    assert status(clone, env) == {}
    # Nothing to recompute: every output, the activations included, came from the bucket.
    full = sh(["dvc", "repro"], clone, env, timeout=900)
    assert "Running stage" not in full.stdout
    assert "Stage 'foundation_capture' didn't change" in full.stdout
    assert "Stage 'foundation_report' didn't change" in full.stdout
    # A plain `dvc pull` finds everything too.
    assert sh(["dvc", "pull"], clone, env, check=False).returncode == 0


def test_pull_names_a_missing_remote(origin, tmp_path: Path) -> None:
    repo, home = origin
    env = base_env(tmp_path / "none", home)
    clone = clone_of(repo, tmp_path / "none", env)
    proc = sh([sys.executable, "-m", "llmlab.pull", "-r", "minio"], clone, env, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: DVC remote 'minio' is not configured (configured: s3)")
    assert not (clone / "data/foundation/prompts.jsonl").exists()


def test_pull_fails_when_a_pushed_output_is_missing(origin, s3, tmp_path: Path) -> None:
    repo, home = origin
    env = base_env(tmp_path / "gap", home)
    creds = {"access_key_id": s3["key"], "secret_access_key": s3["secret"]}
    clone = clone_of(repo, tmp_path / "gap", env, **creds)
    # dvc.lock names a version of the prompts that nobody pushed.
    lock_path = clone / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text())
    for out in lock["stages"]["foundation_capture"]["outs"]:
        if out["path"] == "data/foundation/prompts.jsonl":
            out["md5"] = "0" * 32
    lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))
    # --allow-missing would hide it; the project's pull does not.
    assert sh(["dvc", "pull", "--allow-missing"], clone, env, check=False).returncode == 0
    proc = sh([sys.executable, "-m", "llmlab.pull"], clone, env, check=False)
    assert proc.returncode != 0
    assert "data/foundation/prompts.jsonl" in proc.stderr
    assert "data/foundation/activations" not in proc.stderr


def test_partial_pull_of_one_output(origin, s3, tmp_path: Path) -> None:
    repo, home = origin
    env = base_env(tmp_path / "part", home)
    # Credentials from the environment this time, not from config.
    env |= {"AWS_ACCESS_KEY_ID": s3["key"], "AWS_SECRET_ACCESS_KEY": s3["secret"]}
    clone = clone_of(repo, tmp_path / "part", env)
    # Metrics and plots are `cache: false`: they come with git, no pull needed.
    assert json.loads((clone / "metrics/foundation.json").read_text())["n_prompts"] == 40
    assert not (clone / "data/foundation/prompts.jsonl").exists()
    sh(["dvc", "pull", "data/foundation/prompts.jsonl"], clone, env)
    assert (clone / "data/foundation/prompts.jsonl").is_file()
    assert not (clone / "data/foundation/activations").exists()
    assert not any((clone / ".dvc/cache").rglob("*.dir"))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong secret", "Forbidden"),
        ("no credentials", "Unable to locate credentials"),
        ("bad endpoint", "Could not connect to the endpoint URL"),
    ],
)
def test_remote_failures_are_clear(origin, s3, tmp_path: Path, case: str, message: str) -> None:
    repo, home = origin
    local = {"access_key_id": s3["key"], "secret_access_key": s3["secret"]}
    if case == "wrong secret":
        local["secret_access_key"] = "not-the-secret"
    elif case == "no credentials":
        local = {}
    else:
        local["endpointurl"] = f"http://127.0.0.1:{free_port()}"
    dest = tmp_path / "fail"
    env = base_env(dest, home)
    clone = clone_of(repo, dest, env, **local)
    proc = sh(["dvc", "pull"], clone, env, check=False, timeout=60)
    assert proc.returncode != 0
    assert f"ERROR: failed to connect to s3 ({BUCKET}/store" in proc.stderr
    assert message in proc.stderr
    assert not (clone / "data/foundation/prompts.jsonl").exists()


def test_remote_holds_no_secrets_and_every_output(origin, s3) -> None:
    import boto3

    repo, home = origin
    env = base_env(repo, home)
    committed = sh(["git", "show", "HEAD:.dvc/config"], repo, env).stdout
    assert s3["endpoint"] in committed and f"s3://{BUCKET}/store" in committed
    assert s3["key"] not in committed and s3["secret"] not in committed
    assert s3["secret"] in (repo / ".dvc/config.local").read_text()
    assert sh(["git", "check-ignore", ".dvc/config.local"], repo, env).returncode == 0
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["foundation_capture"]["outs"]}
    acts = outs["data/foundation/activations"]
    client = boto3.client(
        "s3",
        endpoint_url=s3["endpoint"],
        region_name=REGION,
        aws_access_key_id=s3["key"],
        aws_secret_access_key=s3["secret"],
    )
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(k.startswith("store/runs/") for k in keys), "run cache not pushed"
    assert any(k.startswith("store/files/md5/") for k in keys)
    # The activations went up too: their directory manifest and every per-layer file.
    layer_files = (repo / "data/foundation/activations").iterdir()
    pushed = {acts.removesuffix(".dir")} | {md5(f.read_bytes()).hexdigest() for f in layer_files}
    stored = {
        k.removeprefix("store/files/md5/").replace("/", "").removesuffix(".dir") for k in keys
    }
    assert outs["data/foundation/prompts.jsonl"] in stored
    assert len(pushed) > 2 and pushed <= stored, "activations missing from the bucket"
