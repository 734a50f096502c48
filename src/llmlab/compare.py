"""Compare experiments: each family's headline, mean and interval across runs, and one plot.

    python -m llmlab.compare <exp> [<exp> ...] [--out plots/compare.png] [--ci 0.95]

An experiment is a DVC experiment name (`dvc exp show`), a branch, a tag or a commit. For each
family whose `metrics/<family>.json` the experiments carry, every headline number is listed with
its mean over the experiments (e.g. the seeds of a sweep) and a Student-t interval of that mean,
next to the value of each run. A number with its own interval in the headline (`gap.value`,
`gap.lo`, `gap.hi`) is compared through its value; the plot draws those, one panel per family.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from llmlab.headline import leaves
from llmlab.io import DataError
from llmlab.plots import interval_panels
from llmlab.stage import run_stage

FAMILIES = ("foundation", "persona", "preferences", "introspection", "inoculation")


def resolve(repo: str, names: list[str]) -> dict[str, str]:
    """Return {name: git revision}; experiment names become their commits."""
    from dvc.repo import Repo
    from dvc.repo.experiments.utils import resolve_name
    from scmrepo.exceptions import RevError

    with Repo(repo) as r:
        refs = resolve_name(r.scm, names)
        out = {}
        for name in names:
            ref = refs.get(name)
            try:
                out[name] = r.scm.get_ref(str(ref)) if ref is not None else r.scm.resolve_rev(name)
            except RevError:
                raise DataError(
                    f"{name}: neither an experiment nor a git revision of {repo}"
                ) from None
        return out


def headline_of(repo: str, rev: str, family: str) -> dict[str, Any] | None:
    """Return the flattened headline of a family at a revision; None where it has none."""
    import dvc.api

    try:
        shown = dvc.api.metrics_show(f"metrics/{family}.json", repo=repo, rev=rev)
    except FileNotFoundError:  # the family has not run at that revision
        return None
    return leaves(shown) or None


def summarise(values: list[float], ci: float) -> tuple[float, float, float]:
    """Return the mean and the Student-t interval of the mean (NaN bounds for one value)."""
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean())
    if len(arr) < 2:
        return mean, math.nan, math.nan
    sem = float(stats.sem(arr))
    if sem == 0.0:
        return mean, mean, mean
    lo, hi = stats.t.interval(ci, len(arr) - 1, loc=mean, scale=sem)
    return mean, float(lo), float(hi)


def family_table(
    runs: dict[str, dict[str, Any]], ci: float
) -> list[tuple[str, float, float, float, list[float], bool]]:
    """Return rows (metric, mean, lo, hi, run values, has its own interval) for one family."""
    keys: list[str] = []
    for flat in runs.values():
        keys += [k for k in flat if k not in keys and not k.endswith((".lo", ".hi"))]
    rows = []
    for key in keys:
        values = [float(flat[key]) for flat in runs.values() if flat.get(key) is not None]
        if not values:
            continue
        name = key.removesuffix(".value")
        rows.append((name, *summarise(values, ci), values, key.endswith(".value")))
    return rows


def _fmt(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.4g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("experiments", nargs="+", help="experiment names, branches, tags or commits")
    ap.add_argument("--repo", default=".")
    ap.add_argument("--out", type=Path, default=Path("plots/compare.png"))
    ap.add_argument("--ci", type=float, default=0.95, help="interval level (default 0.95)")
    args = ap.parse_args()
    if not 0 < args.ci < 1:
        raise DataError(f"--ci {args.ci}: must be between 0 and 1")
    revs = resolve(args.repo, args.experiments)
    panels = {}
    for family in FAMILIES:
        runs = {}
        for name, rev in revs.items():
            flat = headline_of(args.repo, rev, family)
            if flat is not None:
                runs[name] = flat
        if not runs:
            continue
        rows = family_table(runs, args.ci)
        width = max(len(r[0]) for r in rows)
        print(f"\n## {family}: {len(runs)} of {len(revs)} experiments ({', '.join(runs)})")
        print(f"{'metric':<{width}}  {'mean':>9}  {f'{args.ci:.0%} interval':>22}  runs")
        for name, mean, lo, hi, values, _ in rows:
            interval = f"[{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(lo) else "n/a (one run)"
            runs_text = " ".join(_fmt(v) for v in values)
            print(f"{name:<{width}}  {_fmt(mean):>9}  {interval:>22}  {runs_text}")
        panels[f"{family} ({len(runs)} runs)"] = [
            (name, mean, lo, hi, values) for name, mean, lo, hi, values, own in rows if own
        ]
    if not panels:
        raise DataError(f"none of {', '.join(revs)} carries a metrics/<family>.json")
    if not any(panels.values()):
        print("\nno plot: no headline number with an interval in these experiments")
        return
    interval_panels(
        args.out,
        panels,
        title=f"Headline metrics across {len(revs)} experiments: mean, {args.ci:.0%} t-interval, "
        "runs (grey)",
        xlabel="value",
    )
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    run_stage(main, gpus=0)
