"""`dvc pull` of every output the remote is meant to hold, i.e. all but the `push: false` ones.

A plain `dvc pull` of the whole pipeline exits 1 after a fresh clone, because the outputs marked
`push: false` in dvc.yaml (recomputable activations) are never uploaded. `--allow-missing` hides
that, but it also hides an adapter or dataset somebody forgot to push. This command pulls the
pushable outputs by name instead: it exits 0 when the remote holds all of them and fails, naming
them, when any is missing. The `push: false` outputs are listed and left to `dvc repro`.

    python -m llmlab.pull [--dry] [--family NAME ...] [dvc pull options: --run-cache -r s3 -j 8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PullPlan:
    """Outputs of a DVC project sorted by what `dvc pull` can do with them."""

    pull: list[str] = field(default_factory=list)  # cached, pushable, recorded in a lock file
    unpushed: list[str] = field(default_factory=list)  # `push: false`: recomputed, not pulled
    unlocked: list[str] = field(default_factory=list)  # cached but no hash yet (stage never ran)


def plan(root: str | Path = ".", families: list[str] | None = None) -> PullPlan:
    """Return the pull plan of the DVC project at `root` (dvc.yaml, dvc.lock and .dvc files).

    `families` keeps only the outputs of stages named `<family>_*` (e.g. ["persona"]).
    """
    from dvc.repo import Repo

    result = PullPlan()
    with Repo(os.fspath(root)) as repo:
        for out in repo.index.outs:
            name = getattr(out.stage, "name", "")
            if families and not any(name.startswith(f"{f}_") for f in families):
                continue
            if not out.use_cache or out.is_in_repo is False:
                continue  # cache: false (committed to git) or an external output
            path = os.path.relpath(out.fs_path, repo.root_dir).replace(os.sep, "/")
            if not out.can_push:
                result.unpushed.append(path)
            elif not out.hash_info:
                result.unlocked.append(path)
            else:
                result.pull.append(path)
    for paths in (result.pull, result.unpushed, result.unlocked):
        paths.sort()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dry", action="store_true", help="print the plan, pull nothing")
    ap.add_argument(
        "--family", action="append", help="only this family's outputs (repeatable), e.g. persona"
    )
    args, dvc_args = ap.parse_known_args(argv)
    todo = plan(".", args.family)
    if todo.unpushed:
        print("not pulled (push: false; `dvc repro` recomputes them when needed):")
        print("".join(f"  {p}\n" for p in todo.unpushed), end="")
    if todo.unlocked:
        print("not pulled (not in dvc.lock yet; their stages have not run):")
        print("".join(f"  {p}\n" for p in todo.unlocked), end="")
    if args.dry:
        print("would pull:")
        print("".join(f"  {p}\n" for p in todo.pull), end="")
        return 0
    if not todo.pull:
        print("nothing to pull")
        return 0
    cmd = [sys.executable, "-m", "dvc", "pull", *dvc_args, *todo.pull]
    return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
