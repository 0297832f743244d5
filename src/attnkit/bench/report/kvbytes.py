"""KV-cache accuracy against the bytes a policy holds (``kv_bytes / kv_full_bytes`` of
its rows), not its nominal keep ratio: a policy holding at least the full cache's bytes
(a query-aware policy that keeps every token) is flagged, never shown as a saving.
Where the policy compresses only some layers (Gemma 3: its 3 global layers; the window
layers hold their window in any cache), the share of those layers' bytes is shown
beside the all-layer share, which stays the one plotted and compared."""

from __future__ import annotations

import html
from typing import Any

from ..store import Row
from .aggregate import fmt, metric

FULL_SHARE = 1.0  # bytes held / full cache's bytes at or above which a policy saves nothing


def bytes_share(rows: list[Row]) -> float | None:
    """Mean bytes held over mean bytes of a full cache of the same tokens (None unmeasured)."""
    held, full = metric(rows, "kv_bytes"), metric(rows, "kv_full_bytes")
    return held / full if held is not None and full else None


def compressed_layers_share(rows: list[Row]) -> float | None:
    """Mean bytes held on the layers the policy compresses over a full cache of those
    layers, where they are fewer than all layers (else None: the all-layer share says it)."""
    held, full = metric(rows, "kv_policy_layers_bytes"), metric(rows, "kv_policy_layers_full_bytes")
    all_full = metric(rows, "kv_full_bytes")
    if held is None or not full or all_full is None or full >= all_full:
        return None
    return held / full


def compressed_text(rows: list[Row]) -> str:
    """``; compressed layers 27.0%`` where the policy compresses only some layers, else ``""``."""
    share = compressed_layers_share(rows)
    return "" if share is None else f"; compressed layers {100 * share:.1f}%"


def share_text(share: float | None) -> str:
    """``20.0%``, or ``holds 102% of full`` for a share >= FULL_SHARE, or ``-``."""
    if share is None:
        return "-"
    return f"holds {100 * share:.0f}% of full" if share >= FULL_SHARE else f"{100 * share:.1f}%"


def acc_bytes(rows: list[Row]) -> str:
    """Accuracy with the bytes share next to it: ``0.5 (20% bytes)`` / ``1 (holds 102% of full)``."""
    acc, share = fmt(metric(rows, "score")), bytes_share(rows)
    if share is None:
        return acc
    if share >= FULL_SHARE:
        return f"{acc} ({share_text(share)})"
    return f"{acc} ({100 * share:.0f}% bytes{compressed_text(rows)})"


def bytes_figure(name: str, lines: list[str], by: dict, refs: list[tuple[str, float | None]]) -> Any:
    """Accuracy vs bytes held (% of the full cache), one curve per policy; the full cache
    as a dashed level up to 100%; points at or beyond 100% drawn as crosses and flagged."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for line in lines:
        pts = sorted((100 * s, metric(rs, "score"), budget, compressed_text(rs)) for (ln, budget), rs in by.items()
                     if ln == line and (s := bytes_share(rs)) is not None)
        if not pts:
            continue
        fig.add_trace(go.Scatter(
            x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=html.escape(line),
            text=[html.escape(f"{line}@{b or 'all'}") + (f" (holds {x:.0f}% of full)" if x >= 100 * FULL_SHARE else "")
                  + html.escape(extra) for x, _, b, extra in pts],
            marker={"symbol": ["x" if p[0] >= 100 * FULL_SHARE else "circle" for p in pts], "size": 9},
            hovertemplate="%{text}<br>bytes held %{x:.1f}% of full<br>accuracy %{y:.2f}<extra></extra>"))
    for label, acc in refs:
        if acc is not None:
            fig.add_trace(go.Scatter(x=[0, 100], y=[acc, acc], mode="lines", name=html.escape(label),
                                     line={"dash": "dash"}))
    fig.add_vline(x=100, line={"dash": "dot", "color": "#888"}, annotation_text="full cache's bytes")
    fig.update_layout(title=f"{name}: accuracy vs bytes held (% of the full cache; x: at or above 100%, no saving)",
                      xaxis_title="bytes held (% of the full cache)", yaxis_title="accuracy", yaxis_range=[-0.05, 1.05],
                      height=400)
    return fig
