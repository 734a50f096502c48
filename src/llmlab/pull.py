"""`make pull`: every output the DVC remote holds, and its run-cache, in one `dvc pull`.

It names the remote it pulls from (the one given with `-r`, else the project's default) before
pulling, so a clone whose `.dvc/config` lacks the shared remote does not quietly pull from
another one, and refuses in one line when there is no such remote. Everything else is DVC's
own `dvc pull`: one call, so DVC collects the pipeline once (naming each output as a target
cost about 2 s of collection per target).

    python -m llmlab.pull [--dry] [--family NAME ...] [-r REMOTE] [dvc pull options: -j 8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


class RemoteError(Exception):
    """The remote to pull from is not configured."""


def remote_of(root: str | Path, name: str | None) -> tuple[str, str]:
    """Return (name, url) of the DVC remote `name`, or of the default remote when None."""
    from dvc.config import Config

    config = Config(os.fspath(Path(root) / ".dvc"))
    remotes = config.get("remote", {})
    chosen = name or config.get("core", {}).get("remote")
    if not chosen:
        raise RemoteError("no default DVC remote: `dvc remote add -d NAME URL`, or pass -r NAME")
    if chosen not in remotes:
        known = ", ".join(sorted(remotes)) or "none"
        raise RemoteError(f"DVC remote {chosen!r} is not configured (configured: {known})")
    return chosen, remotes[chosen]["url"]


def pull_command(remote: str, families: list[str] | None, dvc_args: list[str]) -> list[str]:
    """Return the one `dvc pull` that brings the outputs (of `families`' stages, if given)."""
    cmd = [sys.executable, "-m", "dvc", "pull", "--run-cache", "-r", remote, *dvc_args]
    if families:
        cmd += ["--glob", *(f"{family}_*" for family in families)]
    return cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dry", action="store_true", help="name the remote and the command only")
    ap.add_argument("-r", "--remote", help="DVC remote to pull from (default: the project's)")
    ap.add_argument(
        "--family", action="append", help="only this family's stages (repeatable), e.g. persona"
    )
    args, dvc_args = ap.parse_known_args(argv)
    try:
        name, url = remote_of(".", args.remote)
    except RemoteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cmd = pull_command(name, args.family, dvc_args)
    print(f"pulling from DVC remote '{name}' ({url})", flush=True)
    if args.dry:
        print(" ".join(["dvc", *cmd[3:]]))
        return 0
    return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
