"""One look for every figure: colours, line styles, figure sizes and how figures are saved.

Figures are drawn with matplotlib's Agg backend (no display needed, identical on CI and laptops).
Colours carry meaning and are the same in every figure: a symmetry kind always has the same colour,
a prediction always the same colour and line style (measured solid, exact dashed, paper dotted), and
layers are coloured by depth along one sequential colormap so "early" and "late" read at a glance.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, Colormap, ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

KIND_COLORS: dict[str, str] = {"translation": "#1b9e77", "scale": "#d95f02", "rescale": "#7570b3"}
"""One colour per symmetry kind (colour-blind safe Dark2 entries)."""

PREDICTION_STYLE: dict[str, dict[str, Any]] = {
    "measured": {"color": "#222222", "linestyle": "-", "label": "measured"},
    "predicted_exact": {"color": "#1f77b4", "linestyle": "--", "label": "exact recurrence"},
    "predicted_breaking": {"color": "#2ca02c", "linestyle": "-.", "label": "exact + measured breaking"},
    "predicted_paper": {"color": "#d62728", "linestyle": ":", "label": "paper (modified flow)"},
}
"""Colour, line style and legend label of each column of the groups frame that holds a charge."""

SPLIT_STYLE: dict[str, dict[str, Any]] = {
    "train": {"color": "#1f77b4", "linestyle": "-"},
    "val": {"color": "#d62728", "linestyle": "--"},
}

DEPTH_CMAP = "viridis"
RC: dict[str, Any] = {
    "figure.dpi": 110,
    "savefig.dpi": 130,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "legend.framealpha": 0.85,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.3,
}


@contextmanager
def style() -> Iterator[None]:
    """Apply the package's rcParams for the duration of a figure function."""
    with plt.rc_context(RC):  # type: ignore[arg-type]
        yield


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 4.0, height: float = 3.2, **kw: Any) -> Figure:
    """A constrained-layout figure of `nrows x ncols` panels of `width x height` inches each.

    Constrained layout keeps titles, labels and colourbars from overlapping.
    """
    return plt.figure(figsize=(width * ncols, height * nrows), layout="constrained", **kw)


def depth_colors(layers: Sequence[str], cmap: str | Colormap = DEPTH_CMAP) -> dict[str, tuple[float, ...]]:
    """Colour per layer by its position in `layers` (first = dark, last = bright)."""
    cm = plt.get_cmap(cmap) if isinstance(cmap, str) else cmap
    n = len(layers)
    return {layer: tuple(cm(0.05 + 0.85 * (i / max(n - 1, 1)))) for i, layer in enumerate(layers)}


def depth_colorbar(fig: Figure, ax: Any, layers: Sequence[str], label: str = "layer depth") -> None:
    """A discrete colourbar that names the layers (only a few tick labels when there are many)."""
    colors = list(depth_colors(layers).values())
    n = len(colors)
    if n == 0:
        return
    norm = BoundaryNorm(list(range(n + 1)), n)
    sm = ScalarMappable(norm=norm, cmap=ListedColormap(colors))
    cb = fig.colorbar(sm, ax=ax, ticks=[i + 0.5 for i in range(n)], fraction=0.05, pad=0.02)
    step = max(1, n // 8)
    cb.ax.set_yticks([i + 0.5 for i in range(0, n, step)])
    cb.ax.set_yticklabels([short_layer(layers[i]) for i in range(0, n, step)], fontsize=7)
    cb.set_label(label)


def short_layer(name: str, width: int = 18) -> str:
    """A layer name short enough for a tick label: keep the tail, which is the informative part."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def save(fig: Figure, path: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write `fig` as `path` with each suffix in `formats`; returns the files written."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    stem = base.with_suffix("") if base.suffix.lstrip(".") in formats else base
    out = []
    for fmt in formats:
        target = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(target, format=fmt)  # constrained layout already fits everything; "tight" would draw twice
        out.append(target)
    return out


def png_bytes(fig: Figure, dpi: int | None = None) -> bytes:
    """The figure rendered as PNG bytes (for embedding in the HTML report)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def close(fig: Figure) -> None:
    plt.close(fig)


def moving_average(values: pd.Series | np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over `window` samples (edges use the samples available)."""
    s = pd.Series(np.asarray(values, dtype=np.float64))
    return s.rolling(window, center=True, min_periods=1).mean().to_numpy()


def plain_log_ticks(axis: Any) -> None:
    """Log-axis ticks at 1, 2, 5 x 10^k labelled as plain numbers (no crowded minor-tick labels on short ranges)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def smoothing_window(n: int, smooth: int | None) -> int:
    """Samples per moving average: `smooth` when given, else 1/40 of the series (at least 1)."""
    return max(1, n // 40) if smooth is None else max(1, int(smooth))
