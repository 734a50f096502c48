"""Figures and plot data for experiment reports.

Figures are built on `matplotlib.figure.Figure` with an explicit Agg canvas rather than through
pyplot: no global backend is switched, no display is needed, and a figure is never registered
in pyplot's figure manager, so it is freed once the function returns (nothing is left open).
Every PNG is written atomically through `llmlab.io.atomic_path`, and every figure has a title
and axis labels.
"""

from __future__ import annotations

import csv
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llmlab.io import atomic_path, write_json
from llmlab.stats import Estimate, pearson_ci

PathLike = str | os.PathLike[str]
Interval = Estimate | tuple[float, float, float] | Sequence[float]

_DPI = 120
# Above this many bars a grouped bar chart is drawn horizontally (see bar_with_ci).
HORIZONTAL_BARS = 24
# At most this many point labels in a scatter (see labelled_points).
MAX_POINT_LABELS = 12


def _new_figure(width: float = 7.0, height: float = 4.5) -> tuple[Figure, Any]:
    """Return a fresh Agg-backed figure and its single axes."""
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Figure, path_png: PathLike) -> None:
    """Write the figure as PNG atomically, then release its artists."""
    try:
        fig.tight_layout()
        with atomic_path(path_png, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        fig.clf()


def _label(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    """Set title and axis labels, refusing blank ones so no figure ships unlabelled."""
    for name, text in (("title", title), ("xlabel", xlabel), ("ylabel", ylabel)):
        if not str(text).strip():
            raise ValueError(f"{name} must be a non-empty string")
    # Wrapped to the figure's width (about ten characters an inch at the title's size), so a
    # long title on a narrow figure is never cut at the edges.
    ax.set_title(textwrap.fill(str(title), max(30, int(ax.figure.get_figwidth() * 10))))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _unpack(item: Interval) -> tuple[float, float, float]:
    """Return (value, lo, hi) from an Estimate or a 3-tuple."""
    if isinstance(item, Estimate):
        return item.value, item.lo, item.hi
    value, lo, hi = item
    return float(value), float(lo), float(hi)


def bar_with_ci(
    path_png: PathLike,
    groups: list[str],
    series: dict[str, list[Interval]],
    title: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
    xlabel: str = "condition",
) -> None:
    """Write a grouped bar chart with interval error bars; returns nothing.

    `groups` are the categories (e.g. conditions); `series` maps a legend label (e.g.
    "triggered", "untriggered") to one Estimate or (value, lo, hi) per group. `xlabel` names
    the categories and `ylabel` the values. A NaN value is written as "n/a" where its bar
    would be, and a chart whose values are all zero says so, so neither reads as missing.
    More than HORIZONTAL_BARS bars turn the chart on its side (categories down the page), so
    it stays legible at page width instead of becoming a wide strip.
    """
    if not groups or not series:
        raise ValueError("bar_with_ci needs at least one group and one series")
    for name, items in series.items():
        if len(items) != len(groups):
            raise ValueError(f"series {name!r} has {len(items)} values for {len(groups)} groups")
    n_bars = len(groups) * len(series)
    horizontal = n_bars > HORIZONTAL_BARS
    if horizontal:
        fig, ax = _new_figure(8.0, min(2.0 + 0.22 * n_bars, 14.0))
    else:
        fig, ax = _new_figure(min(max(5.0, 1.5 + 0.6 * n_bars), 9.0), 4.5)
    pos = np.arange(len(groups))
    width = 0.8 / len(series)
    finite: list[float] = []
    for k, (name, items) in enumerate(series.items()):
        vals = np.array([_unpack(it) for it in items], dtype=float).reshape(-1, 3)
        value, lo, hi = vals[:, 0], vals[:, 1], vals[:, 2]
        finite += [float(v) for v in vals.ravel() if math.isfinite(v)]
        # Negative extents can only come from rounding or a malformed interval; draw none.
        err = np.vstack([np.clip(value - lo, 0, None), np.clip(hi - value, 0, None)])
        err = np.nan_to_num(err, nan=0.0)
        offset = (k - (len(series) - 1) / 2) * width
        at = pos + offset if not horizontal else pos[::-1] - offset
        if horizontal:
            ax.barh(at, value, width, xerr=err, capsize=2, label=name)
        else:
            ax.bar(at, value, width, yerr=err, capsize=3, label=name)
        for a in at[np.isnan(value)]:
            # Written just off the zero line where the bar would start.
            ax.annotate("n/a", (0.0, a) if horizontal else (a, 0.0),
                        xytext=(3, 0) if horizontal else (0, 3), textcoords="offset points",
                        ha="left" if horizontal else "center",
                        va="center" if horizontal else "bottom",
                        rotation=90 if not horizontal and len(series) > 2 else 0,
                        fontsize=9, color="0.3")  # fmt: skip
    if horizontal:
        ax.set_yticks(pos[::-1], groups)
        if ylim is not None:
            ax.set_xlim(*ylim)
        ax.axvline(0.0, color="black", linewidth=0.6)
        _label(ax, title, ylabel, xlabel)
    else:
        ax.set_xticks(pos)
        # Long condition lists get slanted labels so neighbouring names do not overlap.
        slant = len(groups) > 4
        ax.set_xticklabels(groups, rotation=20 if slant else 0, ha="right" if slant else "center")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.axhline(0.0, color="black", linewidth=0.6)
        _label(ax, title, xlabel, ylabel)
    if finite and all(v == 0.0 for v in finite):
        ax.text(0.5, 0.5, "every value is 0", transform=ax.transAxes, ha="center",
                va="center", fontsize=12, color="0.35")  # fmt: skip
    elif not finite:
        ax.text(0.5, 0.5, "n/a: no value could be estimated", transform=ax.transAxes,
                ha="center", va="center", fontsize=12, color="0.35")  # fmt: skip
    if len(series) > 1:
        ax.legend(fontsize=8)
    _save(fig, path_png)


def line_plot(
    path_png: PathLike,
    x: Sequence[float],
    series: dict[str, list[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    hline: float | None = None,
) -> None:
    """Write a line plot of one or more series over shared x values; returns nothing.

    `hline` draws a dashed horizontal reference line (e.g. chance level or a baseline).
    """
    if not series:
        raise ValueError("line_plot needs at least one series")
    xs = np.asarray(x, dtype=float)
    fig, ax = _new_figure()
    for name, ys in series.items():
        if len(ys) != xs.size:
            raise ValueError(f"series {name!r} has {len(ys)} values for {xs.size} x values")
        ax.plot(xs, np.asarray(ys, dtype=float), marker="o", markersize=3, label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1.0)
    if len(series) > 1:
        ax.legend()
    _label(ax, title, xlabel, ylabel)
    _save(fig, path_png)


def scatter_plot(
    path_png: PathLike,
    x: Sequence[float],
    y: Sequence[float],
    labels: Sequence[str] | None = None,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    annotate_r: bool = True,
) -> None:
    """Write a scatter plot, optionally labelling points and annotating Pearson r; returns nothing.

    The annotation, a second title line, shows r with its 95% Fisher-z interval and n (NaN
    pairs dropped); with fewer than 4 finite pairs or a constant axis it says r is undefined.
    """
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    if xs.size != ys.size:
        raise ValueError(f"x and y differ in length ({xs.size} vs {ys.size})")
    if labels is not None and len(labels) != xs.size:
        raise ValueError(f"{len(labels)} labels for {xs.size} points")
    fig, ax = _new_figure(6.0, 5.0)
    ax.scatter(xs, ys, s=18, alpha=0.8)
    shown = labelled_points(xs, ys) if labels is not None else []
    for i in shown:
        ax.annotate(str(labels[i]), (xs[i], ys[i]), fontsize=7, xytext=(3, 3),  # type: ignore[index]
                    textcoords="offset points")  # fmt: skip
    finite = int((np.isfinite(xs) & np.isfinite(ys)).sum())
    if labels is not None and len(shown) < finite:
        ax.text(0.99, 0.01, f"labelled: the {len(shown)} of {finite} points farthest out",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.35")  # fmt: skip
    _label(ax, title, xlabel, ylabel)
    if annotate_r:
        try:
            c = pearson_ci(xs, ys)
            note = f"Pearson r = {c.r:.3f} [95% CI {c.lo:.3f}, {c.hi:.3f}], n = {c.n}"
        except ValueError:
            note = "Pearson r undefined (fewer than 4 points or a constant axis)"
        # A second title line keeps the annotation off the data, wherever the points fall.
        ax.set_title(f"{title}\n{note}", fontsize=10)
    _save(fig, path_png)


def labelled_points(xs: np.ndarray, ys: np.ndarray) -> list[int]:
    """Return the indices of the points to label: all, or the MAX_POINT_LABELS farthest out.

    Distance is from the median in robust (median absolute deviation) units. Beyond a dozen labels in one scatter they overlap into an unreadable block; the outliers
    are the points a reader asks about.
    """
    ok = np.flatnonzero(np.isfinite(xs) & np.isfinite(ys))
    if ok.size <= MAX_POINT_LABELS:
        return ok.tolist()

    def robust(v: np.ndarray) -> np.ndarray:
        mad = float(np.median(np.abs(v - np.median(v)))) or float(np.std(v)) or 1.0
        return (v - np.median(v)) / mad

    dist = np.hypot(robust(xs[ok]), robust(ys[ok]))
    return sorted(ok[np.argsort(-dist)[:MAX_POINT_LABELS]].tolist())


def violin_plot(
    path_png: PathLike,
    data: dict[str, list[float]],
    title: str,
    ylabel: str,
    markers: dict[str, float] | None = None,
    xlabel: str = "distribution",
) -> None:
    """Write one violin per key of `data`, with an optional highlighted value each; returns nothing.

    `markers[key]` is drawn as a red diamond over that key's violin (e.g. the trait direction
    among random directions). A distribution with fewer than two distinct finite values has
    no density to draw and is shown as points instead.
    """
    if not data:
        raise ValueError("violin_plot needs at least one distribution")
    markers = markers or {}
    unknown = sorted(set(markers) - set(data))
    if unknown:
        raise ValueError(f"markers for keys not in data: {unknown}")
    names = list(data)
    fig, ax = _new_figure(max(5.0, 1.5 + 1.1 * len(names)), 4.5)
    labelled = False
    for pos, name in enumerate(names, start=1):
        vals = np.asarray(data[name], dtype=float)
        vals = vals[np.isfinite(vals)]
        if np.unique(vals).size >= 2:
            ax.violinplot([vals], positions=[pos], showmedians=True, widths=0.8)
        elif vals.size:
            ax.scatter(np.full(vals.size, pos), vals, s=12, color="C0")
        if name in markers:
            # Label only the first marker so the legend has a single "highlighted" entry.
            label = None if labelled else "highlighted"
            labelled = True
            ax.scatter([pos], [markers[name]], marker="D", s=60, color="red", zorder=3, label=label)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(names, rotation=20 if len(names) > 4 else 0)
    if markers:
        ax.legend(loc="best")
    _label(ax, title, xlabel, ylabel)
    _save(fig, path_png)


def _scalar(value: Any, key: str) -> Any:
    """Return a JSON/CSV-ready scalar; numpy scalars unwrap, non-finite floats become None."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise ValueError(f"field {key!r}: plot rows must be flat; got {type(value).__name__}")


def write_series(path: PathLike, rows: list[dict[str, Any]]) -> int:
    """Write plot data for `dvc plots` atomically; returns the number of rows written.

    The format follows the suffix: `.json` gives a JSON list of flat objects, `.csv` a CSV
    with a header (the union of keys in first-seen order). Non-finite floats are written as
    null (JSON) or an empty cell (CSV), since neither format has a portable NaN.
    """
    target = Path(path)
    clean = [{str(k): _scalar(v, str(k)) for k, v in row.items()} for row in rows]
    suffix = target.suffix.lower()
    if suffix == ".json":
        write_json(target, clean)
    elif suffix == ".csv":
        header: dict[str, None] = {}
        for row in clean:
            header.update(dict.fromkeys(row))
        with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(header), restval="")
            writer.writeheader()
            writer.writerows(clean)
    else:
        raise ValueError(f"{target}: write_series supports .json and .csv, got {suffix!r}")
    return len(clean)


def interval_panels(
    path_png: PathLike,
    panels: dict[str, list[tuple[str, float, float, float, Sequence[float]]]],
    title: str,
    xlabel: str,
) -> None:
    """Write stacked panels of means with intervals and the runs behind them.

    `panels` maps a panel title (e.g. a family) to rows (label, mean, lo, hi, run values); a
    NaN interval (a single run) draws the mean and runs only. Each panel gets its own x range
    and a height that grows with its rows, so labels never overlap.
    """
    for name, text in (("title", title), ("xlabel", xlabel)):
        if not str(text).strip():
            raise ValueError(f"{name} must be a non-empty string")
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        raise ValueError("no panel has rows to draw")
    heights = [max(1.2, 0.32 * len(rows) + 0.6) for rows in panels.values()]
    fig = Figure(figsize=(8.0, sum(heights) + 0.8), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, (name, rows) in zip(axes[:, 0], panels.items(), strict=True):
        y = np.arange(len(rows))[::-1]
        for yi, (_, mean, lo, hi, runs) in zip(y, rows, strict=True):
            ax.scatter(runs, [yi] * len(runs), s=14, color="0.6", zorder=2)
            if math.isfinite(lo) and math.isfinite(hi):
                ax.hlines(yi, lo, hi, color="C0", linewidth=2.5, zorder=3)
            ax.scatter([mean], [yi], s=36, color="C0", zorder=4)
        ax.set_yticks(y, [r[0] for r in rows])
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(name, loc="left", fontsize=11)
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title)
    _save(fig, path_png)
