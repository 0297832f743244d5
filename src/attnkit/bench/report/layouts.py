"""The layouts a task's ``Section`` can name, and the generic ``table`` layout.

A layout renders the rows of the tasks that share a section (same layout and title)
below the section's heading; ``FIGURES`` lists the figures each layout can draw."""

from __future__ import annotations

from collections.abc import Callable

from ..store import Row
from ..tasks import Column, Section
from .aggregate import fmt, group, method_labels, metric, task_class, variant_key
from .fidelity import fidelity_layout
from .multiples import curve, line_figure
from .page import Report, Table
from .retrieval import retrieval_layout
from .speed import kv_decode_layout, speed_layout
from .winrate import winrate_tables


def table_layout(rep: Report, section: Section, rows: list[Row]) -> None:
    """Per task: one row per (method, variant, length) with the section's ``columns``
    (default: the task's score), and each column's metric vs length (``"vs_length"``)."""
    for task, rs in group(rows, lambda r: r.task).items():
        cls = task_class(task)
        columns = section.columns or (Column("score", cls.score_name),)
        labels = method_labels(rs)
        variants = {r.variant for r in rs} != {"default"}
        by = group(rs, lambda r: (r.label, r.variant, r.length))
        better = "higher" if cls.higher_is_better else "lower"
        title = section.table_title or f"{task}: {cls.score_name} by method and length ({better} is better)"
        t = Table(title, ["method", *([section.variant_header] if variants else []), "length",
                          *[c.header for c in columns], "n"], note=section.note)
        for label, variant, length in sorted(by, key=lambda k: (labels.index(k[0]), variant_key(k[1]), k[2])):
            cell = by[(label, variant, length)]
            t.add(label, *([variant] if variants else []), length,
                  *[fmt(metric(cell, c.metric), c.digits) for c in columns], len(cell))
        rep.table(t)
        if "vs_length" in section.figures:
            _vs_length(rep, task, columns, labels, group(rs, lambda r: (r.label, r.length)))


def _vs_length(rep: Report, task: str, columns: tuple[Column, ...], labels: list[str], by: dict) -> None:
    """One figure per column: the metric (mean over variants and samples) vs length."""
    for column in columns:
        curves = []
        for label in labels:
            lengths = sorted(n for (lab, n) in by if lab == label)
            curves.append(curve(label, lengths, [metric(by[(label, n)], column.metric) for n in lengths]))
        refs = [c for c in curves if c["name"] == "full"]
        rep.fig(line_figure([c for c in curves if c["name"] != "full"], refs, f"{task}: {column.header} vs length",
                            "length (tokens)", column.header, x_type="log", height=380))


def fidelity_models_layout(rep: Report, section: Section, rows: list[Row]) -> None:
    """The fidelity layout once per model (a run directory may hold several), then the
    per-layer win rates against the baseline and the held-out comparison across models."""
    models = list(dict.fromkeys(r.model for r in sorted(rows, key=lambda r: r.created)))
    for model in models:
        if len(models) > 1:
            rep.p(f"**{model}**")
        fidelity_layout(rep, section, [r for r in rows if r.model == model])
    winrate_tables(rep, rows)


LAYOUTS: dict[str, Callable[[Report, Section, list[Row]], None]] = {
    "table": table_layout,
    "retrieval": retrieval_layout,
    "fidelity": fidelity_models_layout,
    "speed": speed_layout,
    "kv_decode": kv_decode_layout,
}
FIGURES = {"table": ("vs_length",), "retrieval": ("heatmap", "vs_depth"), "fidelity": ("error_vs_density",),
           "speed": ("vs_length",), "kv_decode": ()}
CACHE_LAYOUTS = ("kv_decode",)  # layouts that show the rows of every cache setting themselves


def check_section(task: str, section: Section) -> None:
    """A clear error for a section naming a layout or figure that does not exist."""
    if section.layout not in LAYOUTS:
        raise ValueError(f"task {task!r}: unknown report layout {section.layout!r}; allowed: {', '.join(LAYOUTS)}")
    for figure in section.figures:
        if figure not in FIGURES[section.layout]:
            raise ValueError(f"task {task!r}: layout {section.layout!r} has no figure {figure!r}; allowed: "
                             f"{', '.join(FIGURES[section.layout]) or 'none'}")
