"""Aggregation shared by the report's sections: grouping rows, means of metrics, method
labels and their colors, number formats, and which rows a task's layout owns."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from ..store import Row
from ..tasks import TASKS, Task
from ..tasks.base import PASS_MARK


def task_class(name: str) -> type[Task]:
    """The registered task ``name``; the base ``Task`` (a plain table) for a task this
    process does not know (rows of an old run, a task defined in a script)."""
    return TASKS.get(name, Task)


def layout_of(task: str) -> str:
    """The report layout of a task (``Task.section.layout``)."""
    return task_class(task).section.layout


def rows_of_layout(rows: list[Row], layout: str) -> list[Row]:
    """The rows of every task reported with ``layout``."""
    return [r for r in rows if layout_of(r.task) == layout]


def mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def group(rows: list[Row], key: Callable[[Row], Any]) -> dict[Any, list[Row]]:
    out: dict[Any, list[Row]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return dict(out)


def metric(rows: list[Row], name: str) -> float | None:
    return mean(r.metrics.get(name) if name != "score" else r.score for r in rows)


def method_labels(rows: list[Row]) -> list[str]:
    """Method labels in first-seen order, 'full' first (the baseline)."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r.label, None)
    return sorted(seen, key=lambda label: (label != "full", list(seen).index(label)))


GREYS = ("#7f7f7f", "#222A2A", "#778AAE")  # kept for the full baseline: never a method's colour


def color(labels: list[str], label: str) -> str:
    """One color per method, the same in every figure (no grey: grey is the full baseline's)."""
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
    if len(labels) > len(palette):  # more methods than the classic colors: a 24-color palette, greys left out
        from plotly.colors import qualitative

        palette = tuple(c for c in qualitative.Dark24 if c not in GREYS)
    return palette[labels.index(label) % len(palette)]


def variant_key(variant: str) -> tuple:
    """Sort 'layer2' before 'layer15'."""
    tail = variant.removeprefix("layer")
    return (0, int(tail), "") if tail.isdigit() else (1, 0, variant)


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def depth_text(d: float | None) -> str:
    return "-" if d is None else f"{d * 100:.0f}%"


def budget_sort(text: str) -> tuple:
    """Token budgets ascending, then percentages ascending, then no budget."""
    if not text:
        return (2, 0.0)
    if text.endswith("%"):
        return (1, float(text[:-1]))
    return (0, float(text))


def line_of(r: Row) -> str:
    """The curve a row belongs to: its label without the budget (``snapkv``), or the
    method's label for a row of the normal cache (the reference)."""
    suffix = f"@{r.budget}" if r.budget else ""
    return r.label[: len(r.label) - len(suffix)] if suffix and r.label.endswith(suffix) else r.label


def reference(rows: list[Row], cached: list[Row], task: str, variant: str) -> list[Row]:
    """Rows of the normal cache for the cases (and prefill methods) measured with a cache."""
    cases = {(r.method, r.config, r.length, r.depth, r.sample) for r in cached}
    return [r for r in rows if not r.cache and r.task == task and r.variant == variant
            and (r.method, r.config, r.length, r.depth, r.sample) in cases]


def full_name(label: str) -> str:
    return "full cache" if label == "full" else f"{label} (full cache)"


def kept_percent(r: Row) -> float | None:
    """Share of the prompt a row's budget keeps, in percent (tokens / prompt tokens)."""
    if r.budget.endswith("%"):
        return float(r.budget[:-1])
    prompt = r.metrics.get("prompt_tokens") or r.metrics.get("context_tokens") or r.length
    return min(100.0, 100 * float(r.budget) / prompt) if r.budget and prompt else None


FULL_OK = PASS_MARK  # the full baseline "succeeds" on a retrieval case when it scores at least this


def case_of(r: Row) -> tuple:
    """The case a row measured (the same prompt for every method)."""
    return (r.task, r.variant, r.length, r.depth, r.sample)


def full_solved(rows: list[Row]) -> set[tuple] | None:
    """The cases where the ``full`` baseline (normal cache) scores >= FULL_OK; None when
    ``full`` measured none of them (nothing to restrict a comparison to)."""
    full = [r for r in rows if r.label == "full" and not r.cache]
    return {case_of(r) for r in full if r.score is not None and r.score >= FULL_OK} if full else None


def fails_note(score: float | None) -> str:
    """`` (full fails here)`` for a full-baseline accuracy below FULL_OK, else ``""``."""
    return " (full fails here)" if score is not None and score < FULL_OK else ""
