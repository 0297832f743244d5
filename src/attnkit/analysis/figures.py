"""Figures of a HeadProfile: one (layer x head) heatmap per score as PNG, coarse attention
maps of chosen heads, and an HTML page.

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


def write_page(prof: HeadProfile, path: Path, pngs: dict[str, str], note: str = "",
               maps: list[tuple[str, int, int, str]] = ()) -> None:
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
    if maps and prof.maps is not None:
        rep.h2("Attention maps of chosen heads")
        rep.p("Mass of each key bin averaged over the sampled query rows of each row bin (log10); "
              "rows without a sampled query are blank.")
        for why, l, h, png in maps:
            rep.p(f"layer {l} head {h}: {why}; PNG: {png}")
            rep.fig(map_figure(prof, l, h, why))
    Path(path).write_text(rep.html(), encoding="utf-8")


def chosen_heads(prof: HeadProfile) -> list[tuple[str, int, int]]:
    """Heads worth a look: the top of sink, hidden sinks, streaming, retrieval, the most
    uniform head, and the clearest head of each pattern class: [(why, layer, head)], no repeats."""
    picks: list[tuple[str, int, int]] = []
    for kind, why in (("sink", "top sink"), ("hidden_sink_mass", "top hidden sinks"), ("streaming", "top streaming"),
                      ("retrieval", "top retrieval")):
        picks += [(why, l, h) for l, h, _ in prof.top(kind, 1)]
    flat = prof.entropy_norm.flatten()
    if flat.numel():
        i = int(torch.nan_to_num(flat, nan=-1.0).argmax())
        picks.append(("most uniform", i // prof.heads, i % prof.heads))
    for c, name in enumerate(PATTERNS):
        own = torch.where(prof.pattern == c, prof.pattern_recall[..., c], torch.full_like(prof.sink, -1.0))
        if bool((prof.pattern == c).any()):
            i = int(own.flatten().argmax())
            picks.append((f"clearest {name}", i // prof.heads, i % prof.heads))
    seen, out = set(), []
    for why, l, h in picks:
        if (l, h) not in seen:
            seen.add((l, h))
            out.append((why, l, h))
    return out


def log_map(prof: HeadProfile, layer: int, head: int) -> torch.Tensor:
    """log10 of a head's coarse attention map (floor 1e-6)."""
    assert prof.maps is not None
    return torch.log10(prof.maps[layer, head].clamp_min(1e-6))


def map_figure(prof: HeadProfile, layer: int, head: int, why: str) -> Any:
    import plotly.graph_objects as go

    z = log_map(prof, layer, head)
    bins = z.shape[0]
    n = prof.meta.get("tokens", bins)
    ticks = [round((i + 0.5) * n / bins) for i in range(bins)]
    fig = go.Figure(go.Heatmap(z=[[None if v != v else v for v in row] for row in z.tolist()], x=ticks, y=ticks,
                               colorscale="Viridis", colorbar={"title": "log10 mass"},
                               hovertemplate="query ~%{y}, keys ~%{x}: 10^%{z:.2f}<extra></extra>"))
    fig.update_layout(title=f"layer {layer} head {head} ({why}): attention map, {bins} x {bins} bins",
                      xaxis_title="key position", yaxis_title="query position", yaxis={"autorange": "reversed"},
                      height=480, width=560)
    return fig


def write_map_png(prof: HeadProfile, layer: int, head: int, why: str, path: Path) -> str:
    try:
        map_figure(prof, layer, head, why).write_image(str(path), format="png")
        return "kaleido"
    except Exception:
        raster_png(log_map(prof, layer, head), path, cell=max(2, 512 // log_map(prof, layer, head).shape[0]))
        return "raster"
