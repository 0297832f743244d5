"""Figures of a HeadProfile: one (layer x head) heatmap per score as PNG, and an HTML page.

PNG: plotly + kaleido when kaleido finds a Chrome/Chromium (labelled axes and colour
bar); otherwise a plain raster written with the standard library (one cell per head,
layers top to bottom, viridis colours, NaN grey, no text) — the HTML page has the
labelled, interactive versions either way.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import torch

from .profile import SCORES, HeadProfile
from .scores import PATTERNS

TITLES = {
    "sink": "sink score: mass on the first tokens",
    "hidden_sink_mass": "hidden sinks (ACT): mass on non-initial sink tokens",
    "entropy": "row entropy (nats)",
    "entropy_norm": "row entropy / log(row length)",
    "streaming": "streaming-ness: mass inside sink + local window",
    "retrieval": "retrieval score (copy-paste of the needle)",
    "pattern": "MInference pattern class (0 A-shape, 1 vertical-slash, 2 block-sparse)",
}
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def heat_kinds(prof: HeadProfile) -> list[str]:
    """Scores to draw: every score with a value (retrieval only when measured), and the pattern class."""
    return [k for k in SCORES if not bool(torch.isnan(prof.score(k)).all())] + ["pattern"]


def values(prof: HeadProfile, kind: str) -> torch.Tensor:
    return prof.pattern.double() if kind == "pattern" else prof.score(kind)


def heatmap_figure(prof: HeadProfile, kind: str) -> Any:
    import plotly.graph_objects as go

    z = values(prof, kind)
    text = prof.pattern_names() if kind == "pattern" else None
    fig = go.Figure(go.Heatmap(z=[[None if v != v else v for v in row] for row in z.tolist()], colorscale="Viridis",
                               x=list(range(prof.heads)), y=list(range(prof.layers)), text=text,
                               hovertemplate="layer %{y} head %{x}: %{z:.3f}" + (" %{text}" if text else "")
                               + "<extra></extra>", zmin=0 if kind == "pattern" else None,
                               zmax=len(PATTERNS) - 1 if kind == "pattern" else None))
    fig.update_layout(title=TITLES[kind], xaxis_title="head", yaxis_title="layer", height=max(360, 18 * prof.layers + 160),
                      width=max(420, 40 * prof.heads + 220), yaxis={"autorange": "reversed"})
    return fig


def write_png(prof: HeadProfile, kind: str, path: Path) -> str:
    """Write the heatmap of ``kind`` to ``path``; returns "kaleido" or "raster" (the way it was drawn)."""
    try:
        heatmap_figure(prof, kind).write_image(str(path), format="png")
        return "kaleido"
    except Exception:  # no kaleido, or no Chrome for it: the plain raster
        raster_png(values(prof, kind), path)
        return "raster"


def raster_png(z: torch.Tensor, path: Path, cell: int = 16) -> None:
    """(rows, cols) values as a PNG of ``cell`` x ``cell`` pixel squares (viridis, min..max; NaN grey)."""
    finite = z[~torch.isnan(z)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    span = hi - lo or 1.0
    rows = []
    for row in z.tolist():
        pixels = b"".join(bytes(_colour((v - lo) / span) if v == v else (160, 160, 160)) * cell for v in row)
        rows.extend([b"\x00" + pixels] * cell)
    height, width = z.shape[0] * cell, z.shape[1] * cell

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)


def _colour(t: float) -> tuple[int, int, int]:
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(round(x + (y - x) * f) for x, y in zip(a, b))  # type: ignore[return-value]


def write_page(prof: HeadProfile, path: Path, pngs: dict[str, str], note: str = "") -> None:
    """A self-contained HTML page: settings, top heads per score, every heatmap (interactive)."""
    from ..bench.report.page import Report, Table

    rep = Report(f"attnkit analyze: {prof.meta.get('model', 'model')} at {prof.meta.get('tokens', '?')} tokens")
    rep.p("Per (layer, head) attention scores on sampled query rows (docs/analysis.md). Settings: "
          + ", ".join(f"{k}={v}" for k, v in prof.meta.items() if k != "layers_profiled") + ".")
    if note:
        rep.p(note)
    counts = Table("Pattern classes (MInference)", ["pattern", "heads"])
    for i, name in enumerate(PATTERNS):
        counts.add(name, int((prof.pattern == i).sum()))
    rep.table(counts)
    top = Table("Top heads per score (lowest first for entropies)", ["score", "top 5 (layer.head value)"])
    for kind in heat_kinds(prof):
        if kind != "pattern":
            top.add(kind, ", ".join(f"{l}.{h} {v:.3f}" for l, h, v in prof.top(kind, 5)))
    rep.table(top)
    for kind in heat_kinds(prof):
        rep.h2(TITLES[kind])
        rep.p(f"PNG: {pngs.get(kind, '-')}")
        rep.fig(heatmap_figure(prof, kind))
    Path(path).write_text(rep.html(), encoding="utf-8")
