"""Accuracy vs speedup across tasks: the Pareto frontier of the methods measured."""

from __future__ import annotations

import html
import math
from typing import Any

from ..store import Row
from .aggregate import (
    color,
    fmt,
    group,
    method_labels,
    metric,
    rows_of_layout,
    case_of,
    full_solved,
    task_class,
)
from .fidelity import DENSE
from .page import Report, Table


def pareto_points(rows: list[Row]) -> tuple[list[dict[str, Any]], str, str]:
    """Per method: (speedup, accuracy) and what each axis measured.

    speedup: full's prefill seconds / the method's, geometric mean over lengths measured
    for both (tasks with the ``speed`` layout); without speed rows, 1 / density
    (``fidelity`` layout). accuracy: the mean score of the ``retrieval`` tasks; without
    retrieval rows, mean mass recall (``fidelity``). Retrieval accuracy counts only the
    cases the ``full`` baseline solves. ``dense``: the method's fidelity density is >=
    DENSE. ``frontier``: not dense, and no other sparse point is at least as good on both
    axes and better on one (better accuracy: higher, or lower where the retrieval tasks
    say ``higher_is_better = False``).
    """
    speed = group(rows_of_layout(rows, "speed"), lambda r: (r.label, r.length))
    retrieval = rows_of_layout(rows, "retrieval")
    solved = full_solved(retrieval)
    if solved is not None:  # compare methods only where the full baseline succeeds
        retrieval = [r for r in retrieval if case_of(r) in solved]
    fidelity = rows_of_layout(rows, "fidelity")
    x_name = "prefill speedup vs full (measured)" if speed else "1 / density (sparsity, not a measured speedup)"
    y_name = ("retrieval accuracy (cases full solves)" if solved is not None else "retrieval accuracy") if retrieval \
        else "attention-mass recall"
    points = []
    for label in method_labels(rows):
        if speed:
            ratios = []
            for (lab, n), rs in speed.items():
                if lab == label and ("full", n) in speed:
                    a, b = metric(speed[("full", n)], "prefill_seconds"), metric(rs, "prefill_seconds")
                    if a and b:
                        ratios.append(math.log(a / b))
            x = math.exp(sum(ratios) / len(ratios)) if ratios else None
        else:
            density = metric([r for r in fidelity if r.label == label], "density")
            x = 1 / density if density else None
        if retrieval:
            y = metric([r for r in retrieval if r.label == label], "score")
        else:
            y = metric([r for r in fidelity if r.label == label], "recall")
        density = metric([r for r in fidelity if r.label == label], "density")
        if x is not None and y is not None:
            points.append({"label": label, "speedup": x, "accuracy": y,
                           "dense": density is not None and density >= DENSE})
    sign = 1.0 if all(task_class(t).higher_is_better for t in {r.task for r in retrieval}) else -1.0
    sparse = [p for p in points if not p["dense"]]
    for p in points:  # a dense setting is exact attention in effect: never on the frontier, never dominating
        p["frontier"] = not p["dense"] and not any(_dominates(q, p, sign) for q in sparse if q is not p)
    return points, x_name, y_name


def _dominates(q: dict[str, Any], p: dict[str, Any], sign: float) -> bool:
    """``q`` is at least as fast and as accurate as ``p``, and better in one."""
    qa, pa = sign * q["accuracy"], sign * p["accuracy"]
    return q["speedup"] >= p["speedup"] and qa >= pa and (q["speedup"] > p["speedup"] or qa > pa)


def pareto_section(rep: Report, rows: list[Row]) -> None:
    """Accuracy vs speedup per method, and the Pareto frontier (table and figure)."""
    import plotly.graph_objects as go

    points, x_name, y_name = pareto_points(rows)
    if not points:
        return
    measured = x_name.startswith("prefill")
    heading = f"{'Accuracy' if y_name.startswith('retrieval') else 'Attention-mass recall'} vs " \
              f"{'prefill speedup' if measured else '1 / density (sparsity)'}"
    rep.h2(heading)
    t = Table("Pareto frontier", ["method", x_name, y_name, "on frontier"],
              note="dense: the setting keeps >= 99.9% of the causal pairs (exact attention in effect); it is "
                   "never counted on the frontier." + ("" if measured else " 1 / density is how sparse a method "
                                                       "is, not a measured speedup."))
    for p in sorted(points, key=lambda p: -p["speedup"]):
        t.add(p["label"] + (" (dense)" if p["dense"] else ""), fmt(p["speedup"]), fmt(p["accuracy"]),
              "yes" if p["frontier"] else ("no (dense)" if p["dense"] else ""))
    rep.table(t)
    fig = go.Figure()
    front = sorted((p for p in points if p["frontier"]), key=lambda p: p["speedup"])
    fig.add_trace(go.Scatter(x=[p["speedup"] for p in front], y=[p["accuracy"] for p in front], mode="lines",
                             line={"dash": "dot", "color": "#888"}, name="frontier", line_shape="hv"))
    labels = [p["label"] for p in points]
    for p in points:
        text = html.escape(p["label"]) + (" (dense)" if p["dense"] else "")
        fig.add_trace(go.Scatter(x=[p["speedup"]], y=[p["accuracy"]], mode="markers+text", name=html.escape(p["label"]),
                                 text=[text], textposition="top center",
                                 marker={"size": 12, "color": color(labels, p["label"])}, cliponaxis=False))
    fig.update_layout(title=f"{heading} (Pareto frontier: up and right is better)", xaxis_title=x_name,
                      yaxis_title=y_name, xaxis_type="log", height=420)
    rep.fig(fig)
