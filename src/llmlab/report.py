"""Stage report: one markdown page with every family's headline results, plots and params.

Each family's report stage writes its headline `metrics/<family>.json`, every number in
`data/<family>/results.json` and a short `metrics/<family>_report.md` rendered from them. This
page puts the reports (or, for a family without one, the headline) together with the PNGs in
`plots/<family>/` and the params that produced them, so a reader sees the whole state of the
project in one place.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from llmlab.io import read_json, read_yaml, write_text
from llmlab.stage import run_stage

FAMILIES = ("persona", "preferences", "introspection", "inoculation", "foundation")


def headline_rows(metrics: dict, prefix: str = "", depth: int = 0) -> list[tuple[str, object]]:
    """Return (dotted key, value) for scalar leaves in the top two levels of a metrics tree."""
    rows: list[tuple[str, object]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if depth < 1:
                rows.extend(headline_rows(value, name + ".", depth + 1))
        elif isinstance(value, bool | int | float | str) or value is None:
            rows.append((name, value))
    return rows


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def family_section(family: str, params: dict, out_dir: Path) -> list[str]:
    """Return the markdown lines for one family (empty when it has produced nothing)."""
    metrics_path = Path("metrics") / f"{family}.json"
    if not metrics_path.is_file():
        return []
    lines = [f"## {family}", ""]
    report_md = Path("metrics") / f"{family}_report.md"
    if report_md.is_file():
        body = report_md.read_text(encoding="utf-8").strip().splitlines()
        # Demote the family report's headings under this page's family heading.
        lines += [("#" + ln) if ln.startswith("#") else ln for ln in body] + [""]
    else:
        rows = headline_rows(read_json(metrics_path))
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in rows[:40]] + [""]
    pngs = sorted((Path("plots") / family).glob("**/*.png"))
    for png in pngs:
        rel = Path("..") / png if out_dir.name == "metrics" else png
        lines += [f"![{png.stem}]({rel.as_posix()})", ""]
    section = params.get(family)
    if section:
        lines += [
            "<details><summary>params</summary>",
            "",
            "```yaml",
            yaml.safe_dump({family: section}, sort_keys=False).strip(),
            "```",
            "",
            "</details>",
            "",
        ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="metrics/report.md")
    args = ap.parse_args()
    params = read_yaml(args.params)
    out = Path(args.out)
    lines = [
        "# llmlab results",
        "",
        f"Model: `{params['model']}`. Regenerate with `dvc repro report`; compare experiments with "
        "`dvc exp show` and `dvc plots diff`.",
        "",
    ]
    for family in FAMILIES:
        lines += family_section(family, params, out.parent)
    write_text(out, "\n".join(lines).rstrip() + "\n")


if __name__ == "__main__":
    run_stage(main, gpus=0)
