"""Print a params preset as `dvc exp run -S` flags, one per line (for `xargs dvc exp run`).

    python -m llmlab.inoculation.preset configs/inoculation_paper.yaml | xargs dvc exp run

Keys may be dotted params paths (`inoculation.finetune.seeds`) or nested mappings; values use the override grammar `-S` reads
(lists in brackets, null, quoted strings). The preset is validated against params.yaml first,
so a typo fails here with the key named, not halfway through a GPU run.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
from pathlib import Path
from typing import Any

from llmlab.io import DataError, read_yaml
from llmlab.params import parse_params
from llmlab.stage import run_stage


def flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Return (dotted key, leaf value) pairs; lists are leaves."""
    out: list[tuple[str, Any]] = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(flatten(value, dotted + "."))
        else:
            out.append((dotted, value))
    return out


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


def preset_flags(preset: Path, params: Path = Path("params.yaml")) -> list[str]:
    """Return the `-S key=value` flags of a preset after validating params.yaml merged with it."""
    over = read_yaml(preset)
    if not isinstance(over, dict) or not over:
        raise DataError(f"{preset}: expected a non-empty mapping of params overrides")
    pairs = flatten(over)
    parse_params(merge(read_yaml(params), unflatten(pairs)), preset)
    return [f"-S {shlex.quote(f'{key}={override_value(v)}')}" for key, v in pairs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("preset", type=Path)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args()
    print("\n".join(preset_flags(args.preset, args.params)))


if __name__ == "__main__":
    run_stage(main)
