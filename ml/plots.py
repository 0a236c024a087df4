"""PNG figures for reports: task-affinity heatmaps, accuracy tables, bar, line and scatter charts.

Uses matplotlib's object API (Figure + Agg via savefig), never pyplot: no global backend switch, no
display needed, and safe to call from worker threads. Every file is written atomically (ml.atomic: temp
file in the same folder, then os.replace) so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Collection, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from grouplora.ml.atomic import atomic_path

_DPI = 120
_MAX_NAME = 40  # long dataset names are cut so the heatmap keeps its shape
_HIGHLIGHT = "#55A868"


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report image should be readable like any other file
    return Path(path)


def _finish(fig: Figure, ax, path: str | os.PathLike[str], *, title: str, xlabel: str, ylabel: str) -> Path:
    """Grid, legend, labels and title of a one-axes chart, then save it."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def _short(name: object) -> str:
    s = str(name)
    return s if len(s) <= _MAX_NAME else s[: _MAX_NAME - 1] + "…"


def affinity_heatmap(
    T: np.ndarray,
    names: Sequence[str],
    labels: Sequence[int] | np.ndarray | None = None,
    *,
    title: str = "Task affinity",
    path: str | os.PathLike[str],
) -> Path:
    """Heatmap of T (row i = target dataset, column j = helper dataset); with labels, rows and columns
    are ordered by group (then by index) and group boundaries are drawn.

    Colour limits come from the off-diagonal entries, because a large self-affinity diagonal would
    otherwise wash out the pairwise structure; signed data get a diverging map centred at 0.
    """
    T = np.asarray(T, dtype=float)
    n = T.shape[0] if T.ndim == 2 else -1
    if T.ndim != 2 or T.shape[0] != T.shape[1] or n == 0:
        raise ValueError(f"T must be a non-empty square matrix, got shape {T.shape}")
    if not np.all(np.isfinite(T)):
        raise ValueError("T contains NaN or inf entries")
    if len(names) != n:
        raise ValueError(f"got {len(names)} names for {n} datasets")
    order = np.arange(n)
    bounds: list[int] = []
    groups: np.ndarray | None = None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (n,):
            raise ValueError(f"labels must have length {n}, got shape {lab.shape}")
        _, first = np.unique(lab, return_index=True)
        rank = {g: r for r, g in enumerate(lab[np.sort(first)])}  # groups in order of smallest member
        groups = np.array([rank[g] for g in lab])
        order = np.lexsort((np.arange(n), groups))
        bounds = list(np.flatnonzero(np.diff(groups[order])) + 1)
    M = T[np.ix_(order, order)]

    off = M[~np.eye(n, dtype=bool)] if n > 1 else M.ravel()
    lo, hi = float(off.min()), float(off.max())
    if lo < 0 < hi:
        v = max(-lo, hi)
        cmap, norm = "RdBu_r", TwoSlopeNorm(vmin=-v, vcenter=0.0, vmax=v)
    else:
        cmap, norm = "viridis", Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-12)

    side = float(np.clip(3.0 + 0.14 * n, 5.0, 18.0))
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    im = ax.imshow(M, cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fs = float(np.clip(0.8 * side * 72 / max(n, 1) * 0.8, 3.0, 9.0))  # one row per tick label
    ticks = np.arange(n)
    shown = [_short(names[i]) for i in order]
    ax.set_xticks(ticks, shown, rotation=90, fontsize=fs)
    ax.set_yticks(ticks, shown, fontsize=fs)
    ax.set_xlabel("helper dataset j")
    ax.set_ylabel("target dataset i")
    if n <= 15:  # small matrices: print the numbers too
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{M[i, j]:.2g}", ha="center", va="center", fontsize=7, color="black")
    for b in bounds:
        ax.axhline(b - 0.5, color="black", lw=1.5)
        ax.axvline(b - 0.5, color="black", lw=1.5)
    if groups is not None:
        edges = [0, *bounds, n]
        top = ax.secondary_xaxis("top")
        top.set_xticks([(a + b - 1) / 2 for a, b in zip(edges[:-1], edges[1:])],
                       [f"g{k}" for k in range(len(edges) - 1)], fontsize=max(fs, 7))
        title = f"{title} ({len(edges) - 1} groups)"
    ax.set_title(title, pad=18 if groups is not None else 6)
    return _save(fig, path)


def _as_frame(table: pd.DataFrame | Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table.copy()
    return pd.DataFrame.from_dict({k: dict(v) for k, v in table.items()}, orient="index")


def accuracy_table_png(
    table: pd.DataFrame | Mapping[str, Mapping[str, float]],
    path: str | os.PathLike[str],
    title: str = "Accuracy",
    *,
    average: bool = True,
    higher_is_better: bool = True,
    fmt: str | None = None,
    orient: Literal["auto", "methods_rows", "datasets_rows"] = "auto",
) -> Path:
    """Table image of methods × datasets (DataFrame indexed by method, or {method: {dataset: value}}).

    Adds an "avg" column (mean over datasets, NaNs skipped). Each dataset column is coloured on its own
    scale (datasets differ in difficulty), the best cell per column is bold, NaN cells are grey. With more
    than 12 datasets the table is turned so datasets are rows, which keeps it readable up to ~100.
    """
    df = _as_frame(table).apply(pd.to_numeric, errors="coerce")
    if df.empty:
        raise ValueError("accuracy table is empty")
    df.index = [str(i) for i in df.index]
    df.columns = [str(c) for c in df.columns]
    if average and "avg" not in df.columns:
        df["avg"] = df.mean(axis=1, skipna=True)
    if fmt is None:
        vals = df.to_numpy(dtype=float)
        fmt = "{:.3f}" if np.nanmax(np.abs(vals), initial=0.0) <= 1.0 else "{:.1f}"
    datasets_rows = orient == "datasets_rows" or (orient == "auto" and df.shape[1] > 12)
    show = df.T if datasets_rows else df  # per-dataset scaling runs along the dataset axis either way

    vals = show.to_numpy(dtype=float)
    axis = 1 if datasets_rows else 0  # the axis along which methods vary for one dataset
    lo = show.min(axis=axis, skipna=True).to_numpy(dtype=float)  # pandas: all-NaN gives NaN, no warning
    hi = show.max(axis=axis, skipna=True).to_numpy(dtype=float)
    lo, hi = (lo[:, None], hi[:, None]) if datasets_rows else (lo[None, :], hi[None, :])
    spread = np.where(hi > lo, hi - lo, np.nan)
    score = np.where(np.isfinite(spread), (vals - lo) / np.nan_to_num(spread, nan=1.0), 1.0)  # ties: all best
    if not higher_is_better:
        score = 1.0 - score
    best = np.isfinite(vals) & np.isclose(score, 1.0)

    nr, nc = vals.shape
    row_w = max(len(r) for r in show.index) * 0.075 + 0.3
    fig = Figure(figsize=(row_w + 0.75 * nc + 0.5, 0.3 * nr + 1.2))
    ax = fig.add_subplot()
    colours = np.ma.masked_invalid(np.where(np.isfinite(vals), score, np.nan))
    ax.imshow(colours, cmap="Greens", vmin=-0.3, vmax=1.3, aspect="auto", interpolation="nearest")
    for i, j in zip(*np.nonzero(~np.isfinite(vals))):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, color="0.85"))
    for i in range(nr):
        for j in range(nc):
            txt = "–" if not np.isfinite(vals[i, j]) else fmt.format(vals[i, j])
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, weight="bold" if best[i, j] else "normal")
    # labels sit above the table: rotate about their left end so each starts over its own column
    ax.set_xticks(np.arange(nc), [_short(c) for c in show.columns], rotation=45 if nc > 6 else 0,
                  ha="left" if nc > 6 else "center", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(np.arange(nr), [_short(r) for r in show.index], fontsize=8)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.tick_params(length=0)
    avg_pos = list(show.columns if not datasets_rows else show.index).index("avg") if "avg" in df.columns else None
    if avg_pos is not None:  # separate the average from the per-dataset cells
        (ax.axhline if datasets_rows else ax.axvline)(avg_pos - 0.5, color="black", lw=1.2)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def bar_chart(
    values: Mapping[str, float],
    path: str | os.PathLike[str],
    title: str,
    xlabel: str,
    *,
    sort: bool = False,
    highlight: Collection[str] = (),
    highlight_label: str = "highlighted",
) -> Path:
    """Horizontal bar chart (names stay readable however many bars), values printed at the bar ends.
    highlight: names whose bars are drawn in a third colour, with `highlight_label` in a legend."""
    if not values:
        raise ValueError("bar_chart needs at least one value")
    highlight = set(highlight)
    unknown = sorted(highlight - set(values))
    if unknown:
        raise ValueError(f"bar_chart: highlighted names {unknown} have no value")
    items = list(values.items())
    if sort:
        items.sort(key=lambda kv: kv[1], reverse=True)
    names = [_short(k) for k, _ in items]
    vals = np.array([float(v) for _, v in items])
    if not np.all(np.isfinite(vals)):
        raise ValueError("bar_chart values must be finite")
    fig = Figure(figsize=(7.0, 0.3 * len(items) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(items))
    marked = np.array([k in highlight for k, _ in items], dtype=bool)
    colours = np.where(marked, _HIGHLIGHT, np.where(vals >= 0, "#4C72B0", "#C44E52"))
    ax.barh(y, vals, color=colours)
    ax.set_yticks(y, names, fontsize=8)
    for label, m in zip(ax.get_yticklabels(), marked):
        if m:
            label.set_fontweight("bold")
    ax.invert_yaxis()  # first item on top, as in the dict
    span = float(np.ptp(np.append(vals, 0.0))) or 1.0
    for yi, v in zip(y, vals):
        ax.text(v + (0.01 * span if v >= 0 else -0.01 * span), yi, f"{v:.3g}", va="center",
                ha="left" if v >= 0 else "right", fontsize=7)
    ax.axvline(0.0, color="black", lw=0.8)
    if marked.any():
        ax.legend(handles=[Rectangle((0, 0), 1, 1, color=_HIGHLIGHT, label=highlight_label)], fontsize=8,
                  loc="best")
    ax.margins(x=0.12)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _save(fig, path)


def line_chart(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool | None = None,
) -> Path:
    """One line per named series over shared x values; logx=None picks a log axis when positive x span ≥ 100x."""
    xs = np.asarray(x, dtype=float)
    if xs.ndim != 1 or xs.size == 0 or not series:
        raise ValueError("line_chart needs non-empty x and at least one series")
    for name, ys in series.items():
        if len(ys) != xs.size:
            raise ValueError(f"series {name!r} has {len(ys)} points for {xs.size} x values")
    if logx is None:
        logx = bool(np.all(xs > 0) and xs.max() >= 100 * xs.min())
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot()
    for name, ys in series.items():
        ax.plot(xs, np.asarray(ys, dtype=float), marker="o", ms=3, label=_short(name))
    if logx:
        ax.set_xscale("log")
    return _finish(fig, ax, path, title=title, xlabel=xlabel, ylabel=ylabel)


def scatter_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    diagonal: bool = True,
) -> Path:
    """One point cloud per named series {name: (xs, ys)}; diagonal=True draws y = x over the shared range
    (for estimate-vs-truth plots, where distance from the diagonal is the error)."""
    if not series:
        raise ValueError("scatter_chart needs at least one series")
    pts = []
    for name, (xs, ys) in series.items():
        xa, ya = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if xa.shape != ya.shape or xa.ndim != 1:
            raise ValueError(f"series {name!r}: x and y must be 1-D of equal length")
        pts.append((name, xa, ya))
    fig = Figure(figsize=(5.6, 5.2))
    ax = fig.add_subplot()
    for name, xa, ya in pts:
        ax.scatter(xa, ya, s=18, alpha=0.75, label=_short(name))
    if diagonal:
        allv = np.concatenate([np.concatenate([xa, ya]) for _, xa, ya in pts])
        lo, hi = float(np.nanmin(allv)), float(np.nanmax(allv))
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="y = x")
    return _finish(fig, ax, path, title=title, xlabel=xlabel, ylabel=ylabel)


__all__ = ["accuracy_table_png", "affinity_heatmap", "bar_chart", "line_chart", "scatter_chart"]
