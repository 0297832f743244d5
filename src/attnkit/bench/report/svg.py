"""Figures of a report as static SVG files (for docs): needs kaleido and a Chromium."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .page import Report
from .style import legend_entries


def figure_slug(fig: Any, index: int) -> str:
    """A file name for a figure: its number and a slug of its title."""
    title = (fig.layout.title.text or "figure") if fig.layout.title else "figure"
    slug = "".join(c if c.isalnum() else "-" for c in title.lower())
    slug = "-".join(part for part in slug.split("-") if part)[:60].strip("-")
    return f"{index:02d}-{slug}.svg"


def write_svgs(rep: Report, folder: Path) -> list[Path]:
    """Every figure of ``rep`` as ``folder/NN-title.svg``; returns the paths."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise ImportError("writing figures as SVG needs the kaleido package (pip install kaleido) and a "
                          "Chrome/Chromium browser") from None
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    figs = [item for kind, item in rep.parts if kind == "fig"]
    for i, fig in enumerate(figs, 1):
        path = folder / figure_slug(fig, i)
        static = _static_figure(fig)
        static.write_image(str(path), format="svg", width=900, height=static.layout.height)
        paths.append(path)
    return paths


def _static_figure(fig: Any) -> Any:
    """A copy of ``fig`` for a static image: the legend below the plot (long method
    labels would squeeze it) and trace names escaped once, not for HTML and SVG both."""
    import plotly.graph_objects as go

    static = go.Figure(fig)
    for trace in static.data:
        if trace.name:
            trace.name = html.escape(html.unescape(trace.name), quote=False)
    rows = len(legend_entries(static))  # every entry drawn: one line each
    below = 20 * rows + 70  # one legend line per trace under the x axis title
    static.update_layout(legend={"yanchor": "top", "y": -70 / (fig.layout.height or 450), "xanchor": "left", "x": 0},
                         height=(fig.layout.height or 450) + below, margin={"b": below + 10})
    return static
