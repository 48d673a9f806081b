"""Pictures people would rather look at than read: ROC curves, the DROP and GAIN heatmaps
(paper Fig. 4), the DROP-GAIN Pareto plot (Fig. 5, with the intervals as error bars), the
specialists × tasks AUC heatmap. PNG files via matplotlib's Agg canvas (no display, no pyplot
global state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from r2m.evaluation.metrics import auc as auc_of
from r2m.evaluation.metrics import roc
from r2m.evaluation.report import Table
from r2m.names import is_specialist_name


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def roc_plot(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], title: str, path: Path
) -> Path:
    """One ROC curve per entry (`legend -> (labels, scores)`), AUC in the legend; specialists
    dotted, so the merged models stand out."""
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab20"]
    for i, (name, (labels, scores)) in enumerate(curves.items()):
        fpr, tpr = roc(labels, scores, name)
        ax.plot(fpr, tpr, lw=1.5, color=colours(i % 20), ls=":" if is_specialist_name(name) else "-",
                label=f"{name} (AUC {auc_of(labels, scores, name):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="false positive rate (real called fake)", ylabel="true positive rate (fake caught)",
           title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def _matrix(table: Table) -> np.ndarray:
    return np.array(
        [[np.nan if v is None else float(v) for v in row] for row in table.values], dtype=float
    )


def heatmap(table: Table, path: Path, *, cmap: str, diverging: bool = False,
            vmin: float | None = None, vmax: float | None = None) -> Path:
    """A `Table` as an annotated heatmap. `diverging` centres the colours on 0 (GAIN)."""
    data = _matrix(table)
    finite = data[np.isfinite(data)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if diverging:
        span = max(abs(lo), abs(hi), 1e-6)
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)
    else:
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
    rows, cols = len(table.rows), len(table.columns)
    fig = Figure(figsize=(1.2 + 0.9 * cols, 1.0 + 0.45 * rows))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(cols), labels=list(table.columns), rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(rows), labels=list(table.rows), fontsize=8)
    for r in range(rows):
        for c in range(cols):
            v = data[r, c]
            if math.isfinite(v):
                red, green, blue, _ = image.cmap(norm(v))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # text readable on the cell
                ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set_title(table.title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def drop_heatmap(table: Table, path: Path) -> Path:
    """Fig. 4a: DROP per seen task × method; darker is better (smaller retention loss)."""
    return heatmap(table, path, cmap="magma")


def gain_heatmap(table: Table, path: Path) -> Path:
    """Fig. 4b: GAIN per unseen set × method; green beats the best specialist, red falls short."""
    return heatmap(table, path, cmap="RdYlGn", diverging=True)


def auc_heatmap(table: Table, path: Path) -> Path:
    """Specialists (or any models) × tasks AUC, colours on the fixed [0.5, 1] scale."""
    return heatmap(table, path, cmap="viridis", vmin=0.5, vmax=1.0)


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """Methods no other method beats on both axes (lower DROP and higher GAIN)."""
    return [
        m for m, (d, g) in points.items()
        if not any((d2 <= d and g2 >= g) and (d2, g2) != (d, g) for d2, g2 in points.values())
    ]


def pareto_plot(points: Mapping[str, tuple[float, float]], path: Path,
                title: str = "DROP-GAIN Pareto (upper left is best)",
                intervals: Mapping[str, tuple[tuple[float, float] | None, tuple[float, float] | None]] | None = None,
                ) -> Path:
    """Fig. 5: x = mean DROP (lower is better), y = mean GAIN (higher is better); `intervals`
    (method -> (DROP interval, GAIN interval)) are drawn as error bars."""
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    front = set(pareto_front(points))
    for name, (d, g) in points.items():
        dx, gy = (intervals or {}).get(name, (None, None))
        if dx is not None or gy is not None:
            ax.errorbar([d], [g], xerr=None if dx is None else [[d - dx[0]], [dx[1] - d]],
                        yerr=None if gy is None else [[g - gy[0]], [gy[1] - g]],
                        fmt="none", ecolor="grey", elinewidth=0.8, capsize=2, zorder=1)
        on_front = name in front
        ax.scatter([d], [g], s=60 if on_front else 35, marker="o" if on_front else "s",
                   color="tab:red" if on_front else "tab:blue", zorder=3)
        ax.annotate(name, (d, g), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if len(front) > 1:
        xs, ys = zip(*sorted(points[m] for m in front))
        ax.plot(xs, ys, color="tab:red", lw=0.8, ls="--", zorder=2)
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set(xlabel="mean DROP on seen tasks (lower is better)",
           ylabel="mean GAIN on unseen sets (higher is better)", title=title)
    ax.grid(alpha=0.3)
    return _save(fig, path)
