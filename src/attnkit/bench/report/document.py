"""A run directory's report: the long-context headline (``headline.py``), the run, headline scores, one section per task (its
``Task.section``: the layout and figures it names), cross-task analyses (accuracy vs
speedup, accuracy with a compressed KV cache) and failed measurements.

Sections come from the registered tasks, never from a list of task names: a task's rows
are shown by the layout its section names, in the order of ``Section.order``. Rows
measured with a KV-cache setting (``Row.cache``) appear only in the KV-cache analysis
and in layouts that show cache settings themselves (``kv_decode``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from ..store import Row, Store
from ..tasks import Section
from .aggregate import fmt, group, layout_of, method_labels, metric, task_class
from .best import best_section
from .headline import headline_section
from .layouts import CACHE_LAYOUTS, LAYOUTS, check_section
from .page import Report, Table
from .pareto import pareto_section
from .retrieval import cache_accuracy_section
from .style import finish
from .svg import write_svgs

# Analyses across tasks, placed among the task sections by order.
ANALYSES: tuple[tuple[float, Callable[[Report, list[Row], list[Row]], None]], ...] = (
    (50.0, lambda rep, plain, rows: pareto_section(rep, plain)),
    (70.0, lambda rep, plain, rows: cache_accuracy_section(rep, rows)),
    (75.0, lambda rep, plain, rows: best_section(rep, rows)),
)


def _run_section(rep: Report, store: Store, rows: list[Row]) -> None:
    runs = store.runs()
    rep.h2("Run")
    if runs:
        env = runs[-1]["environment"]
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(runs[0]["started"]))
        models = sorted({r.model for r in rows}) or [runs[-1]["config"].get("model", "?")]
        rep.p(f"Model: {', '.join(models)}. {len(rows)} results from {len(runs)} invocation(s), first started {started}.")
        t = Table("Environment", ["field", "value"])
        for key in ("cpu", "cpu_count", "torch_threads", "load_average", "gpu", "python", "torch", "transformers", "attnkit",
                    "git_commit", "platform"):
            if env.get(key) is not None:
                t.add(key, env[key])
        if runs[-1].get("command"):
            t.add("command", runs[-1]["command"])
        rep.table(t)


def _headline_section(rep: Report, plain: list[Row], tasks: list[str]) -> None:
    """Mean score per method and task (normal cache), and the best method of each task
    (highest score, or lowest where the task says ``higher_is_better = False``)."""
    if not tasks:
        return
    rep.h2("Headline scores")
    classes = [task_class(t) for t in tasks]
    t = Table("Mean headline score per task (normal cache; means over every case)",
              ["method"] + [f"{name}: {cls.score_name} ({'higher' if cls.higher_is_better else 'lower'} is better)"
                            for name, cls in zip(tasks, classes)])
    labels = method_labels(plain)
    by = group(plain, lambda r: (r.task, r.label))
    scores = {key: metric(rs, "score") for key, rs in by.items()}
    for label in labels:
        t.add(label, *[fmt(scores.get((task, label))) for task in tasks])
    best = [_best(task, cls.higher_is_better, labels, scores) for task, cls in zip(tasks, classes)]
    t.add("best", *best)
    rep.table(t)


def _best(task: str, higher: bool, labels: list[str], scores: dict[tuple[str, str], float | None]) -> str:
    """The method(s) with the best mean score of ``task`` (ties listed), or ``-``."""
    measured = {label: scores[(task, label)] for label in labels if scores.get((task, label)) is not None}
    if not measured:
        return "-"
    top = max(measured.values()) if higher else min(measured.values())
    return ", ".join(label for label, value in measured.items() if value == top)


def _sections(rows: list[Row]) -> dict[tuple[str, str], tuple[Section, list[str]]]:
    """(layout, title) -> (the section, its tasks), for every task with rows."""
    out: dict[tuple[str, str], tuple[Section, list[str]]] = {}
    for task in dict.fromkeys(r.task for r in rows):
        section = task_class(task).section
        check_section(task, section)
        key = (section.layout, section.title or task)
        out.setdefault(key, (section, []))[1].append(task)
    return out


def _task_sections(rep: Report, rows: list[Row], plain: list[Row]) -> None:
    """Every task's section and the analyses, by order."""
    parts: list[tuple[float, int, Callable[[], None]]] = []
    for i, ((layout, title), (section, tasks)) in enumerate(_sections(rows).items()):
        own = [r for r in (rows if layout in CACHE_LAYOUTS else plain) if r.task in tasks]
        parts.append((section.order, i, lambda s=section, t=title, rs=own: _render(rep, s, t, rs)))
    for i, (order, analysis) in enumerate(ANALYSES):
        parts.append((order, -len(ANALYSES) + i, lambda a=analysis: a(rep, plain, rows)))
    for _, _, render in sorted(parts, key=lambda p: (p[0], p[1])):
        render()


def _render(rep: Report, section: Section, title: str, rows: list[Row]) -> None:
    if not rows:
        return
    rep.h2(title)
    if section.intro:
        rep.p(section.intro)
    LAYOUTS[section.layout](rep, section, rows)


def _errors_section(rep: Report, store: Store) -> None:
    """Failures that no later run has measured (a retry that succeeded clears its failure)."""
    cur = store.conn.execute("SELECT task, label, error FROM errors WHERE key NOT IN (SELECT key FROM results) ORDER BY id")
    errs = cur.fetchall()
    if not errs:
        return
    rep.h2("Failed measurements")
    t = Table(f"{len(errs)} failed (retried by running the same command again)", ["task", "method", "error"])
    for task, label, error in errs[-50:]:
        t.add(task, label, error[:300])
    rep.table(t)


def build(run_dir: str | Path) -> Report:
    """The Report of a run directory (reads ``results.sqlite``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.sqlite").is_file():
        raise FileNotFoundError(f"{run_dir} has no results.sqlite: run `attnkit bench --out {run_dir}` first")
    with Store(run_dir) as store:
        rows = store.rows()
        plain = [r for r in rows if not r.cache and layout_of(r.task) not in CACHE_LAYOUTS]
        rep = Report(f"attnkit benchmark: {run_dir.name}")
        headline_section(rep, rows)
        _run_section(rep, store, rows)
        tasks = sorted(dict.fromkeys(r.task for r in rows if not r.cache), key=lambda t: task_class(t).section.order)
        _headline_section(rep, [r for r in rows if not r.cache], tasks)
        _task_sections(rep, rows, plain)
        _errors_section(rep, store)
    finish([item for kind, item in rep.parts if kind == "fig"], method_labels(rows))
    return rep


def write(run_dir: str | Path, figures: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``run_dir``; returns their paths.

    ``figures``: also write every plot as an SVG file into this folder (for docs; needs
    the ``kaleido`` package and a Chrome/Chromium on the machine)."""
    run_dir = Path(run_dir)
    rep = build(run_dir)
    md, page = run_dir / "report.md", run_dir / "report.html"
    md.write_text(rep.markdown(), encoding="utf-8")
    page.write_text(rep.html(), encoding="utf-8")
    if figures is not None:
        write_svgs(rep, Path(figures))
    return md, page


def summary_json(run_dir: str | Path) -> str:
    """One JSON line of headline numbers per (task, method) for scripts."""
    with Store(run_dir) as store:
        rows = store.rows()
    out = {f"{task}/{label}": metric(rs, "score") for (task, label), rs in group(rows, lambda r: (r.task, r.label)).items()}
    return json.dumps(out, sort_keys=True)
