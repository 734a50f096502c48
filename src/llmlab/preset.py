"""Apply a params preset (configs/*.yaml) as one DVC experiment of the families it sets.

    python -m llmlab.preset configs/persona_paper.yaml                 # run it now
    python -m llmlab.preset configs/persona_paper.yaml --queue -S persona.train.seed=1,2,3
    python -m llmlab.preset configs/persona_paper.yaml --dry-run       # print the command only

The command is `dvc exp run <family>_report ... -S key=value ...`: the targets are the report
stages of the families whose sections the preset sets, so only their stages run. Keys may be
dotted params paths (`persona.train.lr`) or nested mappings; each leaf becomes one `-S`
override (`+key=value` where params.yaml does not have the key yet). params.yaml merged with the preset is
validated before DVC starts, so a typo fails here in one line naming the preset and the key,
not halfway through a GPU run. `-S` flags given here come after the preset's (later wins;
comma lists sweep, with `--queue`), and their keys are checked to exist.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from llmlab.io import DataError, read_yaml
from llmlab.params import FAMILY_SECTIONS, ParamsError, parse_params
from llmlab.stage import run_stage

# Keys of a mapping value must be bare words in DVC's (Hydra's) `-S` override grammar.
_BARE_KEY = re.compile(r"[A-Za-z_][\w-]*")


def _lookup(tree: Any, dotted: str) -> Any:
    """Return the value at a dotted path of a mapping, or KeyError."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def flatten(tree: dict[str, Any], prefix: str = "", base: Any = None) -> list[tuple[str, Any]]:
    """Return (dotted key, value) pairs; lists are leaves.

    With `base` (params.yaml), a mapping is split into its keys only where params.yaml holds a
    mapping there; elsewhere it is one value that replaces the old one.
    """
    out: list[tuple[str, Any]] = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and (base is None or _is_mapping(base, dotted)):
            out.extend(flatten(value, dotted + ".", base))
        else:
            out.append((dotted, value))
    return out


def _is_mapping(base: Any, dotted: str) -> bool:
    try:
        return isinstance(_lookup(base, dotted), dict)
    except KeyError:
        return False


def override(key: str, value: Any, base: Any) -> str:
    """Return one `-S` override; `+key` where params.yaml lacks the key (DVC refuses a plain one)."""
    try:
        _lookup(base, key)
        sign = ""
    except KeyError:
        sign = "+"
    return f"{sign}{key}={override_value(value)}"


def override_value(value: Any) -> str:
    """Return a value in the override grammar of `dvc exp run -S`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        bad = [k for k in value if not (isinstance(k, str) and _BARE_KEY.fullmatch(k))]
        if bad:
            raise DataError(f"preset: mapping key {bad[0]!r} is not a plain name")
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    raise DataError(f"preset: unsupported value {value!r}")


def unflatten(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Return a nested mapping from (dotted key, value) pairs."""
    out: dict[str, Any] = {}
    for dotted, value in pairs:
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DataError(f"preset: key {dotted!r} conflicts with a value set above it")
        node[leaf] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return base with over applied recursively (mappings merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _preset_pairs_and_params(preset: Path, params: Path) -> tuple[list[tuple[str, Any]], Any]:
    """Return the preset's (key, value) overrides and params.yaml merged with them, validated."""
    over = read_yaml(preset)
    if not isinstance(over, dict) or not over:
        raise DataError(f"{preset}: expected a non-empty mapping of params overrides")
    base = read_yaml(params)
    pairs = flatten(over, base=base)
    return pairs, parse_params(merge(base, unflatten(pairs)), preset)


def preset_overrides(preset: Path, params: Path = Path("params.yaml")) -> list[tuple[str, Any]]:
    """Return the preset's (key, value) overrides after validating params.yaml merged with it."""
    return _preset_pairs_and_params(preset, params)[0]


def preset_params(preset: Path, params: Path = Path("params.yaml")) -> Any:
    """Return the typed Params of params.yaml with the preset applied (what its run reads)."""
    return _preset_pairs_and_params(preset, params)[1]


def preset_flags(preset: Path, params: Path = Path("params.yaml")) -> list[str]:
    """Return the `-S key=value` flags of a preset, shell-quoted, one string per flag."""
    base = read_yaml(params)
    return [
        f"-S {shlex.quote(override(key, v, base))}" for key, v in preset_overrides(preset, params)
    ]


def report_targets(keys: list[str], preset: Path) -> list[str]:
    """Return `<family>_report` for every family section the keys set, in the families' order."""
    tops = {key.split(".", 1)[0] for key in keys}
    families = [f for f in FAMILY_SECTIONS if f in tops]
    if not families:
        raise DataError(
            f"{preset}: sets no family's params ({', '.join(FAMILY_SECTIONS)}), "
            "so there are no stages to run"
        )
    return [f"{family}_report" for family in families]


def dvc_command(
    preset: Path,
    params: Path = Path("params.yaml"),
    sweep: tuple[str, ...] = (),
    queue: bool = False,
    name: str | None = None,
) -> list[str]:
    """Return the `dvc exp run` argument list that applies a preset (plus extra `-S` flags)."""
    pairs = preset_overrides(preset, params)
    base = read_yaml(params)
    merged = merge(base, unflatten(pairs))
    for flag in sweep:
        key, eq, _ = flag.partition("=")
        if not eq:
            raise DataError(f"-S {flag}: expected key=value")
        try:
            _lookup(merged, key)
        except KeyError:
            raise ParamsError(f"-S {flag}: {key}: not a key of {params}") from None
    cmd = ["dvc", "exp", "run"]
    if queue:
        cmd.append("--queue")
    if name:
        cmd += ["-n", name]
    cmd += report_targets([k for k, _ in pairs], preset)
    for key, value in pairs:
        cmd += ["-S", override(key, value, base)]
    for flag in sweep:
        cmd += ["-S", flag]
    return cmd


def _dvc_executable() -> str:
    """Return the dvc beside this Python (the project's virtualenv), else the one on PATH."""
    here = str(Path(sys.executable).parent)
    found = shutil.which("dvc", path=f"{here}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        raise DataError("dvc: not found beside this Python or on PATH (make setup installs it)")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("preset", type=Path, help="a params preset, e.g. configs/persona_paper.yaml")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument(
        "-S",
        "--set-param",
        dest="sweep",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further override after the preset's (comma list: a sweep, with --queue)",
    )
    ap.add_argument("--queue", action="store_true", help="queue the experiment(s) instead")
    ap.add_argument("-n", "--name", help="experiment name")
    ap.add_argument("--dry-run", action="store_true", help="print the dvc command, run nothing")
    args = ap.parse_args()
    cmd = dvc_command(args.preset, args.params, tuple(args.sweep), args.queue, args.name)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return
    # A list of arguments, no shell: values with spaces or quotes reach DVC as written.
    sys.exit(subprocess.run([_dvc_executable(), *cmd[1:]], check=False).returncode)


if __name__ == "__main__":
    # No GPU lock here: the stages DVC starts take their own.
    run_stage(main, gpus=0)
