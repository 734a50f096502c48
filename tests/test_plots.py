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
