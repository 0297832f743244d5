"""The ``fidelity`` layout: operator error against exact attention on captured
activations, and its analysis (error vs density, a method against the static BASELINE
at equal density)."""

from __future__ import annotations

import html
import itertools
import math
from typing import Any

from ..store import Row
from ..tasks import Section
from .aggregate import (
    fmt,
    group,
    method_labels,
    metric,
    rows_of_layout,
    variant_key,
)
from .multiples import curve, line_figure
from .page import Report, Table

BASELINE = "streaming"  # the static pattern every dynamic method is compared with at equal density
REFERENCES = ("full", BASELINE)  # drawn in every panel of the error-vs-density small multiples
DENSE = 0.999  # a setting this dense or denser is exact attention in effect, not a sparse method


def dense(point: dict[str, Any]) -> bool:
    """A point (or row metrics) whose density is >= DENSE: it keeps (nearly) every pair."""
    return point.get("density") is not None and point["density"] >= DENSE


def fidelity_layout(rep: Report, section: Section, rows: list[Row]) -> None:
    """Error, mass recall and density per method, layer and length; error vs density
    (figure ``"error_vs_density"``) and the equal-density comparison with BASELINE."""
    t = Table("Fidelity against exact attention (q, k, v captured from the model on real text)",
              ["method", "layer", "length", "rel. error", "mass recall", "density", "method s", "n"],
              note="rel. error = ||o - o*|| / ||o*||; mass recall = share of the exact softmax mass inside the "
                   "method's allowed set; density = allowed / causal pairs (dense: >= 0.999, exact attention in "
                   "effect, never judged against the baseline).")
    labels = method_labels(rows)
    by = group(rows, lambda r: (r.label, r.variant, r.length))
    for (label, variant, length) in sorted(by, key=lambda k: (labels.index(k[0]), variant_key(k[1]), k[2])):
        rs = by[(label, variant, length)]
        t.add(label, variant.removeprefix("layer"), length, fmt(metric(rs, "rel_error")),
              fmt(metric(rs, "recall")), _density_text(metric(rs, "density")), fmt(metric(rs, "method_seconds")), len(rs))
    rep.table(t)
    points = fidelity_points(rows)
    if "error_vs_density" in section.figures and len({p["label"] for p in points}) > 1:
        _error_density_figures(rep, points)
    verdicts = equal_density_comparison(points)
    if verdicts:
        t = Table("Against the static baseline at equal density",
                  ["method", "length", "density", "rel. error", f"{BASELINE} error at that density", "lower error"],
                  note=f"{BASELINE}'s error at a method's density is interpolated (linear in log density) between "
                       f"the {BASELINE} windows measured; errors and densities are means over the layers. "
                       "Content-aware selection should beat position-only selection at equal cost.")
        for v in verdicts:
            t.add(v["label"], v["length"], fmt(v["density"]), fmt(v["rel_error"]), fmt(v["baseline_error"]),
                  "yes" if v["better"] else "NO")
        rep.table(t)


def _density_text(density: float | None) -> str:
    """The density, marked ``(dense)`` at >= DENSE."""
    return fmt(density) + (" (dense)" if density is not None and density >= DENSE else "")


def fidelity_points(rows: list[Row]) -> list[dict[str, Any]]:
    """Per (method label, length): the method name, mean density, mean rel. error and mean
    mass recall over the layers measured (rows of tasks with the ``fidelity`` layout)."""
    by = group(rows_of_layout(rows, "fidelity"), lambda r: (r.label, r.length))
    points = []
    for (label, length), rs in by.items():
        density, error = metric(rs, "density"), metric(rs, "rel_error")
        if density is not None and error is not None:
            points.append({"label": label, "method": rs[0].method, "length": length, "density": density,
                           "rel_error": error, "recall": metric(rs, "recall")})
    return points


def baseline_error_at(points: list[dict[str, Any]], length: int, density: float) -> float | None:
    """The BASELINE's rel. error at ``density`` (log-linear interpolation between its
    measured settings at ``length``); None outside the measured range."""
    base = sorted((p["density"], p["rel_error"]) for p in points if p["method"] == BASELINE and p["length"] == length)
    if len(base) < 2 or density <= 0:
        return None
    if density < base[0][0] or density > base[-1][0]:
        return None
    for (d0, e0), (d1, e1) in itertools.pairwise(base):
        if d0 <= density <= d1:
            if d1 == d0:
                return min(e0, e1)
            w = (math.log(density) - math.log(d0)) / (math.log(d1) - math.log(d0))
            return e0 + w * (e1 - e0)
    return None


def equal_density_comparison(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every sparse method other than the baseline (not ``full``, nor a dense setting,
    density >= DENSE): its error next to the
    baseline's at the same density, and whether it is lower."""
    out = []
    for p in sorted(points, key=lambda p: (p["method"], p["length"], p["density"])):
        if p["method"] in (BASELINE, "full") or dense(p):  # a dense setting is not a sparse win
            continue
        ref = baseline_error_at(points, p["length"], p["density"])
        if ref is not None:
            out.append({**p, "baseline_error": ref, "better": p["rel_error"] < ref})
    return out


def _line_name(point: dict[str, Any]) -> str:
    """The curve a point belongs to: its method, apart for a trained estimator (``estimator=``),
    which is a different method in effect from the same method's training-free default."""
    return point["method"] + (" (trained)" if "estimator=" in point["label"] else "")


def _error_density_figures(rep: Report, points: list[dict[str, Any]]) -> None:
    """One error-vs-density figure per length, one line per method (its settings sorted by density)."""
    names = sorted({_line_name(p) for p in points}, key=lambda m: (m not in REFERENCES, m))
    for length in sorted({p["length"] for p in points}):
        curves = []
        for name in names:
            ps = sorted((p for p in points if _line_name(p) == name and p["length"] == length), key=lambda p: p["density"])
            if ps:
                curves.append(curve(name, [p["density"] for p in ps], [p["rel_error"] for p in ps],
                                    text=[html.escape(p["label"]) + (" (dense)" if dense(p) else "") for p in ps],
                                    hovertemplate="%{text}<br>density %{x:.3f}<br>error %{y:.3f}<extra></extra>",
                                    line={"dash": "dash" if name == BASELINE else None}))
        rep.fig(line_figure([c for c in curves if c["name"] not in REFERENCES],
                            [c for c in curves if c["name"] in REFERENCES],
                            f"Relative output error vs density at {length} tokens (lower-left is better)",
                            "density (allowed / causal pairs)", "relative output error (log; exact points fall below)",
                            x_type="log", y_type="log", y_range=[math.log10(0.003), math.log10(3.0)], height=460))
