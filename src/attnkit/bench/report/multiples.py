"""Line figures of one metric per method: one panel while a few methods are drawn, small
multiples (one panel per method, the references in every panel, shared axes) beyond
``MAX_LINES`` so that many methods never end up as one tangle."""

from __future__ import annotations

import html
import math
from typing import Any

MAX_LINES = 6  # methods drawn as lines in one panel; more: one panel per method
COLS = 3
GREY = "#444444"


def curve(name: str, x: list, y: list, **style: Any) -> dict[str, Any]:
    """A curve to draw: its (unescaped) name, points and extra Scatter settings."""
    return {"name": name, "x": x, "y": y, "style": style}


def line_figure(curves: list[dict[str, Any]], refs: list[dict[str, Any]], title: str, x_title: str, y_title: str,
                x_type: str = "linear", y_type: str = "linear", y_range: list | None = None, height: int = 400) -> Any:
    """``curves`` (one per method) and ``refs`` (baselines such as ``full``, drawn in every
    panel) as one panel, or as small multiples when there are more than MAX_LINES curves."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if len(curves) <= MAX_LINES:
        fig = go.Figure()
        for c in [*refs, *curves]:
            fig.add_trace(_scatter(c, True))
        fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=height)
        fig.update_xaxes(type=x_type)
        fig.update_yaxes(type=y_type, range=y_range)
        return fig
    rows = math.ceil(len(curves) / COLS)
    fig = make_subplots(rows=rows, cols=COLS, shared_xaxes="all", shared_yaxes="all", vertical_spacing=0.12 / rows,
                        subplot_titles=[html.escape(c["name"]) for c in curves], horizontal_spacing=0.05)
    for i, c in enumerate(curves):
        row, col = i // COLS + 1, i % COLS + 1
        for ref in refs:
            fig.add_trace(_scatter(ref, i == 0, color=GREY), row=row, col=col)
        fig.add_trace(_scatter(c, True), row=row, col=col)
    fig.update_xaxes(type=x_type)
    fig.update_yaxes(type=y_type, range=y_range)
    fig.update_xaxes(title_text=x_title, row=rows)
    for row in range(1, rows + 1):
        fig.update_yaxes(title_text=y_title, row=row, col=1)
    fig.update_layout(title=f"{title} (one panel per method; grey: {', '.join(r['name'] for r in refs) or 'none'})",
                      height=max(height, 60 + 230 * rows))
    return fig


def _scatter(c: dict[str, Any], legend: bool, color: str | None = None) -> Any:
    import plotly.graph_objects as go

    style = dict(c["style"])
    style.setdefault("mode", "lines+markers")
    if color:
        style["line"] = {**style.get("line", {}), "color": color}
    return go.Scatter(x=c["x"], y=c["y"], name=html.escape(c["name"]), legendgroup=c["name"], showlegend=legend,
                      **style)
