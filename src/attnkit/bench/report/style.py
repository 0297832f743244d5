"""One look for every figure of a report, applied once the report is built:

- log axes labelled at decades only (1, 10, 100, ...; ``10^k`` far from 1), with
  unlabelled minor ticks in between;
- one colour per method across all figures (``full`` / its cache always neutral grey);
- every method that a figure draws has a legend entry (the legend shown).
"""

from __future__ import annotations

import html
import math
from typing import Any

from .aggregate import color

NEUTRAL = "#444444"  # the full baseline, in every figure
FULL_CACHE = " (full cache)"  # a method measured with the full cache: its colour


def finish(figs: list[Any], labels: list[str]) -> None:
    """Decade ticks, report-wide colours and complete legends for ``figs``."""
    names = _names(figs, labels)
    for fig in figs:
        decade_ticks(fig)
        recolor(fig, names)
        complete_legend(fig)


def method_of(name: str) -> str:
    """The method a trace name stands for: ``full`` for the full cache, a label without
    the ``(full cache)`` suffix otherwise."""
    name = html.unescape(name or "")
    if name in ("full", "full cache"):
        return "full"
    return name.removesuffix(FULL_CACHE)


def _names(figs: list[Any], labels: list[str]) -> list[str]:
    """Every method drawn in the report: ``labels`` first (the report's method order),
    then names only figures know (cache policies, curves of a method), first seen."""
    seen = dict.fromkeys(label for label in labels if label != "full")
    for fig in figs:
        for trace in fig.data:
            if trace.type != "heatmap" and trace.name and method_of(trace.name) != "full":
                seen.setdefault(method_of(trace.name), None)
    return list(seen)


def colour_of(names: list[str], name: str) -> str:
    """The colour of a trace named ``name`` (the neutral grey for the full baseline)."""
    method = method_of(name)
    if method == "full" or method not in names:
        return NEUTRAL
    return color(names, method)


def recolor(fig: Any, names: list[str]) -> None:
    """Give every named trace (not heatmaps, not the ``frontier`` guide) its method's colour."""
    for trace in fig.data:
        if trace.type == "heatmap" or not trace.name or trace.name == "frontier":
            continue
        c = colour_of(names, trace.name)
        if getattr(trace, "line", None) is not None:
            trace.line.color = c
        if getattr(trace, "marker", None) is not None:
            trace.marker.color = c


def complete_legend(fig: Any) -> None:
    """Show the legend, with one entry per trace name (a name already shown keeps one)."""
    shown: set[str] = set()
    named = [t for t in fig.data if t.type != "heatmap" and t.name]
    for trace in named:
        if trace.showlegend is not False:
            shown.add(trace.name)
    for trace in named:
        if trace.name not in shown:
            trace.showlegend = True
            shown.add(trace.name)
    if named:
        fig.update_layout(showlegend=True)


def legend_entries(fig: Any) -> list[str]:
    """The names a figure's legend lists (traces not hidden from it, one per name)."""
    return list(dict.fromkeys(t.name for t in fig.data if t.type != "heatmap" and t.name and t.showlegend is not False))


def decade_text(k: int) -> str:
    """The label of 10^k: plain digits from 0.001 to 10000, ``10^k`` (superscript) beyond."""
    if -3 <= k <= 4:
        return f"{10.0 ** k:g}" if k < 0 else str(10**k)
    return f"10<sup>{k}</sup>"


def decade_ticks(fig: Any) -> None:
    """Every log axis of ``fig`` labelled at powers of ten only, spanning the data."""
    for key in list(fig.layout.to_plotly_json()):
        if not (key.startswith("xaxis") or key.startswith("yaxis")):
            continue
        axis = fig.layout[key]
        if axis.type != "log":
            continue
        values = _axis_values(fig, key)
        if not values:
            continue
        lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
        if axis.range is not None:
            lo, hi = min(lo, math.floor(axis.range[0])), max(hi, math.ceil(axis.range[1]))
        elif hi - lo < 1:  # data within one decade: show the decades around it
            hi = lo + 1
        if axis.range is None and _inside(values, lo, hi) < 2:
            axis.range = [lo, hi]
        ks = list(range(lo, hi + 1))
        axis.update(tickmode="array", tickvals=[10.0**k for k in ks], ticktext=[decade_text(k) for k in ks],
                    minor={"ticks": "outside", "ticklen": 3, "tickvals": _minor(ks)})


def _inside(values: list[float], lo: int, hi: int) -> int:
    """How many decades 10^lo..10^hi fall inside the data's range."""
    a, b = math.log10(min(values)), math.log10(max(values))
    return sum(1 for k in range(lo, hi + 1) if a <= k <= b)


def _minor(ks: list[int]) -> list[float]:
    return [m * 10.0**k for k in ks[:-1] for m in range(2, 10)]


def _axis_values(fig: Any, key: str) -> list[float]:
    """The positive data values drawn on layout axis ``key`` (``xaxis2`` -> traces on ``x2``)."""
    ref = key[0] + key[5:]  # xaxis2 -> x2, yaxis -> y
    out: list[float] = []
    for trace in fig.data:
        if (getattr(trace, key[0] + "axis", None) or key[0]) != ref:
            continue
        vals = getattr(trace, key[0], None)
        if vals is None:
            continue
        out += [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0]
    return out


def log_tick_labels(fig: Any) -> dict[str, list[str]]:
    """Axis name -> the tick labels of each log axis (for tests and checks)."""
    out = {}
    for key in fig.layout.to_plotly_json():
        if (key.startswith("xaxis") or key.startswith("yaxis")) and fig.layout[key].type == "log":
            out[key] = list(fig.layout[key].ticktext or ())
    return out
