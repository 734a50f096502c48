"""Tests for llmlab.plots: every figure function writes a real PNG; series round-trip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmlab.io import read_json
from llmlab.plots import bar_with_ci, line_plot, scatter_plot, violin_plot, write_series
from llmlab.stats import Estimate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000  # a labelled figure, not an empty canvas
    leftovers = [p for p in path.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_bar_with_ci_accepts_estimates_and_tuples(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "bars.png"
    bar_with_ci(
        out,
        ["control", "trigger A", "trigger B"],
        {
            "triggered": [Estimate(0.2, 0.1, 0.3, 10, 100), (0.6, 0.5, 0.7), (0.4, 0.3, 0.5)],
            "untriggered": [(0.1, 0.05, 0.15), (0.12, 0.1, 0.2), (math.nan, math.nan, math.nan)],
        },
        title="Misaligned answer rate",
        ylabel="rate",
        ylim=(0.0, 1.0),
    )
    _assert_png(out)


def test_bar_with_ci_rejects_length_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 groups"):
        bar_with_ci(tmp_path / "x.png", ["a", "b"], {"s": [(1, 0, 2)]}, "t", "y")
    assert not (tmp_path / "x.png").exists()


def test_line_plot(tmp_path: Path) -> None:
    out = tmp_path / "line.png"
    x = list(range(0, 32, 4))
    line_plot(
        out,
        x,
        {"probe": [0.5 + 0.05 * i for i in range(len(x))], "random": [0.5] * len(x)},
        title="Probe accuracy by layer",
        xlabel="layer",
        ylabel="accuracy",
        hline=0.5,
    )
    _assert_png(out)


def test_scatter_plot_with_labels_and_r(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=25)
    y = x + rng.normal(0, 0.5, size=25)
    out = tmp_path / "scatter.png"
    scatter_plot(
        out,
        x,
        y,
        labels=[f"t{i}" for i in range(25)],
        title="Projection vs judged score",
        xlabel="projection",
        ylabel="score",
    )
    _assert_png(out)
    small = tmp_path / "small.png"
    scatter_plot(small, [1, 2], [1, 2], title="Too few", xlabel="x", ylabel="y")
    _assert_png(small)


def test_violin_plot_with_markers(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    out = tmp_path / "violin.png"
    violin_plot(
        out,
        {
            "layer 8": list(rng.normal(size=200)),
            "layer 16": list(rng.normal(size=200)),
            "single": [0.3],
        },
        title="Trait direction among random directions",
        ylabel="projection shift",
        markers={"layer 8": 2.5, "layer 16": 3.1},
    )
    _assert_png(out)
    with pytest.raises(ValueError, match="not in data"):
        violin_plot(tmp_path / "v.png", {"a": [1.0, 2.0]}, "t", "y", markers={"b": 1.0})


def test_missing_title_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="title"):
        line_plot(tmp_path / "l.png", [0, 1], {"s": [0, 1]}, title="", xlabel="x", ylabel="y")
    assert not (tmp_path / "l.png").exists()


def test_write_series_round_trips(tmp_path: Path) -> None:
    rows = [
        {"layer": 0, "accuracy": 0.5, "method": "probe"},
        {"layer": 4, "accuracy": np.float64(0.75), "method": "probe"},
        {"layer": 8, "accuracy": math.nan, "method": "probe"},
    ]
    json_path = tmp_path / "series.json"
    csv_path = tmp_path / "series.csv"
    assert write_series(json_path, rows) == 3
    assert write_series(csv_path, rows) == 3
    loaded = read_json(json_path)
    assert isinstance(loaded, list) and loaded[2]["accuracy"] is None
    for df in (pd.read_json(json_path), pd.read_csv(csv_path)):
        assert list(df["layer"]) == [0, 4, 8]
        assert df["accuracy"].iloc[1] == pytest.approx(0.75)
        assert math.isnan(df["accuracy"].iloc[2])
        assert set(df["method"]) == {"probe"}


def test_write_series_rejects_nested_rows_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="flat"):
        write_series(tmp_path / "a.json", [{"x": [1, 2]}])
    with pytest.raises(ValueError, match="supports"):
        write_series(tmp_path / "a.tsv", [{"x": 1}])


# ---------------------------------------------------------------- DVC templates (.dvc/plots)

ROOT = Path(__file__).resolve().parents[1]
CATEGORICAL_TEMPLATES = {"grouped_bars_ci", "grouped_bars_ci_panels", "bars_ci"}


def _top_level_plots() -> dict[str, dict]:
    import yaml

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    return {name: props for entry in spec["plots"] for name, props in entry.items()}


def _categorical() -> dict[str, dict]:
    return {n: p for n, p in _top_level_plots().items() if p["template"] in CATEGORICAL_TEMPLATES}


def test_categorical_series_carry_the_colour_and_interval_the_templates_draw() -> None:
    plots = _categorical()
    # persona conditions, held-one-topic-out, the introspection variants, inoculation conditions
    assert len(plots) >= 7
    assert not [n for n, p in _top_level_plots().items() if p["template"] == "bar_horizontal"]
    for name, props in plots.items():
        assert (ROOT / ".dvc/plots" / f"{props['template']}.json").is_file(), name
        ((path, y_field),) = props["y"].items()
        rows = read_json(ROOT / path)
        need = {props["x"], y_field, "group", "lo", "hi"}
        if props["template"].endswith("_panels"):
            need.add("panel")
        for row in rows:
            assert need <= set(row), f"{name}: {path} row lacks {sorted(need - set(row))}"
            if row["lo"] is not None and row[props["x"]] is not None:
                assert row["lo"] <= row[props["x"]] + 1e-9 <= row["hi"] + 2e-9, (name, row)


def test_grouped_template_fills_and_renders_through_dvc(tmp_path: Path) -> None:
    """`dvc plots show --json` fills the template; the spec is valid Vega-Lite (vl-convert)."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    shutil.copytree(ROOT / ".dvc/plots", repo / ".dvc/plots")
    (repo / ".dvc/config").write_text("")
    # Every row carries the same keys: DVC drops a plot whose rows differ in their fields.
    rows = [
        {"topic": t, "group": g, "held_r": v, "lo": v - 0.1, "hi": v + 0.1, "note": None}
        for t in ("math", "coding")
        for g, v in (("instruct", 0.3), ("base", 0.1), ("content", -0.2))
    ]
    rows.append({"topic": "trivia", "group": "instruct", "held_r": None, "lo": None, "hi": None,
                 "note": "n/a: one fold"})  # fmt: skip
    (repo / "hoo.json").write_text(json.dumps(rows))
    (repo / "dvc.yaml").write_text(
        "plots:\n  - hoo:\n      template: grouped_bars_ci\n      x: held_r\n"
        "      y:\n        hoo.json: topic\n      title: t\n      x_label: r\n      y_label: topic\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env |= {"DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / "g"),
            "DVC_SYSTEM_CONFIG_DIR": str(tmp_path / "s")}  # fmt: skip
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    out = subprocess.run(
        [dvc, "plots", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    (plot,) = json.loads(out.stdout)["data"]["hoo"]
    spec = plot["content"]
    bar, rule, point, note = spec["spec"]["layer"]
    assert bar["encoding"]["color"]["field"] == "group"
    assert bar["encoding"]["yOffset"]["field"] == "group"
    assert (rule["encoding"]["x"]["field"], rule["encoding"]["x2"]["field"]) == ("lo", "hi")
    assert note["encoding"]["text"]["field"] == "note"
    assert spec["facet"]["row"]["field"] == "rev"
    assert {r["group"] for r in spec["data"]["values"]} == {"instruct", "base", "content"}
    vl_convert = pytest.importorskip("vl_convert")
    png = vl_convert.vegalite_to_png(spec)
    assert png[:8] == PNG_MAGIC and len(png) > 5_000
    svg = vl_convert.vegalite_to_svg(spec)
    for label in ("math", "coding", "trivia", "instruct", "content", "n/a: one fold"):
        assert label in svg, label


def test_interval_panels_one_panel_per_family(tmp_path: Path) -> None:
    from llmlab.plots import interval_panels

    out = tmp_path / "cmp.png"
    interval_panels(
        out,
        {
            "persona (3 runs)": [("gap", 0.5, 0.2, 0.8, [0.3, 0.5, 0.7])],
            "preferences (1 run)": [("heldout_r", 0.4, math.nan, math.nan, [0.4])],
            "empty": [],
        },
        title="Headline metrics",
        xlabel="value",
    )
    _assert_png(out)
    with pytest.raises(ValueError, match="no panel has rows"):
        interval_panels(tmp_path / "x.png", {"a": []}, title="t", xlabel="x")
    with pytest.raises(ValueError, match="xlabel must be"):
        interval_panels(tmp_path / "x.png", {"a": [("k", 1, 1, 1, [1])]}, title="t", xlabel=" ")


def _texts(fig_path: Path, monkeypatch, call) -> list[str]:
    """Return every text the figure drew (labels, annotations), captured before it is saved."""
    import llmlab.plots as plots

    seen: list[str] = []
    real_save = plots._save

    def spy(fig, path):
        for ax in fig.axes:
            seen.extend(t.get_text() for t in ax.texts)
            seen.extend(t.get_text() for t in ax.get_yticklabels() + ax.get_xticklabels())
            seen.append(ax.get_title())
            seen.append(f"size {fig.get_figwidth():.1f}x{fig.get_figheight():.1f}")
        real_save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    call()
    _assert_png(fig_path)
    return seen


def test_bar_with_ci_many_bars_go_horizontal_and_na_is_written(tmp_path, monkeypatch) -> None:
    topics = [f"topic_{i}" for i in range(13)]
    series = {s: [(0.1 * i, 0.1 * i - 0.2, 0.1 * i + 0.2) for i in range(13)] for s in "abc"}
    series["a"][2] = (math.nan, math.nan, math.nan)
    out = tmp_path / "hoo.png"
    texts = _texts(
        out, monkeypatch, lambda: bar_with_ci(out, topics, series, "held out", "r", xlabel="topic")
    )
    # 39 bars: on its side, taller than wide, every topic a y tick, the missing value labelled.
    size = next(t for t in texts if t.startswith("size "))
    width, height = (float(v) for v in size.removeprefix("size ").split("x"))
    assert height > width
    assert set(topics) <= set(texts)
    assert texts.count("n/a") == 1


def test_bar_with_ci_all_zero_and_long_title(tmp_path, monkeypatch) -> None:
    out = tmp_path / "zero.png"
    title = "persona adoption (local judge, 135M): triggered vs untriggered, 95% CI, pooled"
    texts = _texts(
        out,
        monkeypatch,
        lambda: bar_with_ci(out, ["a", "b"], {"x": [(0, 0, 0), (0, 0, 0)]}, title, "rate"),
    )
    assert "every value is 0" in texts
    wrapped = next(t for t in texts if t.startswith("persona adoption"))
    assert "\n" in wrapped and wrapped.replace("\n", " ") == title


def test_scatter_labels_only_the_points_farthest_out(tmp_path, monkeypatch) -> None:
    from llmlab.plots import MAX_POINT_LABELS, labelled_points

    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=60), rng.normal(size=60)
    xs[7], ys[7] = 25.0, 0.0  # far out on x only
    xs[3] = np.nan
    chosen = labelled_points(xs, ys)
    assert len(chosen) == MAX_POINT_LABELS and 7 in chosen and 3 not in chosen
    assert labelled_points(xs[:5], ys[:5]) == [0, 1, 2, 4]  # few points: every finite one
    out = tmp_path / "ood.png"
    labels = [f"p{i}" for i in range(60)]
    texts = _texts(
        out,
        monkeypatch,
        lambda: scatter_plot(out, xs, ys, labels, title="t", xlabel="x", ylabel="y"),
    )
    assert "p7" in texts and sum(t in labels for t in texts) == MAX_POINT_LABELS
    assert f"labelled: the {MAX_POINT_LABELS} of 59 points farthest out" in texts


def test_lines_template_gives_each_series_its_own_colour(tmp_path: Path) -> None:
    """Five variants' curves (one file each, gaps between evaluations) are five coloured lines."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    shutil.copytree(ROOT / ".dvc/plots", repo / ".dvc/plots")
    (repo / ".dvc/config").write_text("")
    variants = ["original", "vague", "r1_minimal", "food_control", "flipped_labels"]
    ys = "".join(f"        train_{v}.json: val_accuracy\n" for v in variants)
    for k, v in enumerate(variants):
        rows = [
            {"step": s, "val_accuracy": 0.5 + 0.01 * k * s if s % 4 == 0 else None, "loss": 1.0}
            for s in range(9)
        ]
        (repo / f"train_{v}.json").write_text(json.dumps(rows))
    (repo / "dvc.yaml").write_text(
        "plots:\n  - acc:\n      template: lines_by_series\n      x: step\n      y:\n"
        + ys
        + "      title: t\n      x_label: step\n      y_label: accuracy\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env |= {"DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / "g"),
            "DVC_SYSTEM_CONFIG_DIR": str(tmp_path / "s")}  # fmt: skip
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "plots", "show", "--json"],
        cwd=repo, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    spec = json.loads(out.stdout)["data"]["acc"][0]["content"]
    assert spec["encoding"]["color"]["field"] == "series"
    assert spec["encoding"]["strokeDash"]["field"] == "rev"
    assert spec["mark"]["invalid"] == "filter"
    vl_convert = pytest.importorskip("vl_convert")
    svg = vl_convert.vegalite_to_svg(spec)
    for v in variants:
        assert f"train_{v}: val_accuracy" in svg, v
