"""Run a benchmark: every (task case x method [x KV-cache setting]) not yet in the run
directory's database.

    from attnkit.bench import build, runner
    cfg = build.build_config({"tasks": ["niah"], "methods": "full,streaming(window=256)"})
    runner.run(cfg, "runs/demo")

Each result is committed the moment it is measured; starting the same run again skips
the finished rows (a failed measurement is logged in ``errors`` and retried next time).
A rich progress bar with a live per-(task, method) summary shows on a terminal; without
one (CI, pipes) the runner prints one plain line per result.
"""

from __future__ import annotations

import itertools
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import NotApplicable
from .spec import BenchConfig, CacheRun, MethodSpec, TaskSpec, run_label
from .store import Row, Store, row_key
from .tasks import TASKS, Case, Context, Task


@dataclass
class Work:
    task: Task
    spec: TaskSpec
    case: Case
    method: MethodSpec
    key: str
    cache: CacheRun | None = None  # None: the normal cache

    @property
    def label(self) -> str:
        return run_label(self.method, self.cache)


@dataclass
class Outcome:
    """What one invocation did."""

    run_dir: Path
    total: int
    skipped: int  # already in the database
    measured: int
    failed: int
    seconds: float
    not_compared: int = 0  # skipped by ``where_full_succeeds``: `full` fails the case
    summary: dict[tuple[str, str], list[float]] = field(default_factory=dict)


def plan(cfg: BenchConfig, max_cases: int | None = None) -> list[Work]:
    """Every (task, case, method, cache setting) of ``cfg``, in run order (methods and cache
    settings innermost, so a case's prompt or captured activations are built once).
    ``max_cases``: only the first N cases of each task (those a full run measures first)."""
    work = []
    for spec in cfg.tasks:
        task = TASKS[spec.name]()
        caches = spec.cache_runs() if task.uses_cache else [None]
        methods = _full_first(spec.methods) if cfg.where_full_succeeds else spec.methods
        for case in itertools.islice(task.cases(spec, cfg.seed), max_cases):
            for method in methods:
                for cache in caches:
                    extra = () if cache is None else (cache.cache.name, cache.cache.config_json,
                                                      cache.budget.text if cache.budget else "")
                    key = row_key(cfg.model, spec.name, case.variant, method.name, method.config_json, case.length,
                                  case.depth, case.sample, *extra)
                    work.append(Work(task, spec, case, method, key, cache))
    return work


def _full_first(methods: list[MethodSpec]) -> list[MethodSpec]:
    """``methods`` with `full` (default config) moved first: its score decides the others'."""
    return sorted(methods, key=lambda m: not (m.name == "full" and m.config_json == "{}"))


def not_compared(store: Store, cfg: BenchConfig, w: Work) -> Optional[str]:
    """Why ``cfg.where_full_succeeds`` skips ``w`` (`full` with the normal cache scored below
    the task's pass mark on its case), or None: measure it. `full` itself, unscored tasks and
    cases `full` has not measured yet are measured."""
    pass_mark = w.task.pass_mark
    if not cfg.where_full_succeeds or pass_mark is None:
        return None
    if w.cache is None and w.method.name == "full" and w.method.config_json == "{}":
        return None
    c = w.case
    stored, score = store.score_of(row_key(cfg.model, w.spec.name, c.variant, "full", "{}", c.length, c.depth,
                                           c.sample))
    if not stored:
        return None
    if score is None:
        return "not compared: full has no score on this case"
    return f"not compared: full scores {score:.3g} here (pass mark {pass_mark:g})" if score < pass_mark else None


def run(cfg: BenchConfig, run_dir: str | Path, progress: Optional[bool] = None, command: Optional[str] = None,
        console: Any = None, lm: Any = None, max_cases: int | None = None) -> Outcome:
    """Measure what is missing from ``run_dir`` and store it. ``progress``: None = a live
    display on a terminal and plain lines otherwise; False = silent. ``lm``: an already
    loaded ``attnkit.models.LoadedModel`` of ``cfg.model`` (loaded on first use otherwise).
    ``max_cases``: measure only the first N cases of each task (None: all of them)."""
    from rich.console import Console

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    console = console or Console(stderr=True)
    start = time.perf_counter()
    store = Store(run_dir)
    try:
        store.start_run(cfg.to_dict(), command)
        work = plan(cfg, max_cases=max_cases)
        done = store.done_keys()
        todo = [w for w in work if w.key not in done]
        outcome = Outcome(Path(run_dir), len(work), len(work) - len(todo), 0, 0, 0.0)
        for row in store.rows():
            outcome.summary.setdefault((row.task, row.label), []).append(row.score)
        ctx = Context(cfg.model, cfg.seed, progress=progress is not False, _lm=lm)
        if any(w.task.needs_model for w in todo):
            if progress is not False:
                console.print(f"attnkit bench: loading {cfg.model}", highlight=False)
            ctx.lm  # noqa: B018 - load before the live display starts, and outside row timings
        if not todo:
            if progress is not False:
                console.print(f"attnkit bench: all {len(work)} results are already in {store.path}")
        elif progress is False:
            for w in todo:
                _one(store, ctx, cfg, w, outcome)
        elif console.is_terminal:
            _run_live(store, ctx, cfg, todo, outcome, console)
        else:
            _run_plain(store, ctx, cfg, todo, outcome, console)
        store.finish_run()
    finally:
        store.close()
    outcome.seconds = time.perf_counter() - start
    return outcome


def _one(store: Store, ctx: Context, cfg: BenchConfig, w: Work, outcome: Outcome) -> Optional[Row]:
    """Measure and store ``w``; None when it failed (logged) or is not compared (counted)."""
    if not_compared(store, cfg, w) is not None:
        outcome.not_compared += 1
        return None
    start = time.perf_counter()
    try:
        extra = {} if w.cache is None else {"cache": w.cache}
        metrics = w.task.measure(ctx, w.case, w.method, w.spec, **extra)
    except (KeyboardInterrupt, SystemExit):
        raise
    except NotApplicable as exc:  # e.g. a KV budget below what the policy always keeps: a recorded cell
        metrics = {"score": None, "not_applicable": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one failing (case, method) must not end a long run
        store.conn.execute(
            "INSERT INTO errors (key, run_id, task, label, error, traceback, created) VALUES (?,?,?,?,?,?,?)",
            (w.key, store.run_id, w.spec.name, w.label, f"{type(exc).__name__}: {exc}",
             traceback.format_exc(), time.time()),
        )
        store.conn.commit()
        outcome.failed += 1
        return None
    seconds = time.perf_counter() - start
    score = metrics.get("score")
    cache = w.cache
    row = Row(model=cfg.model, task=w.spec.name, variant=w.case.variant, method=w.method.name,
              config=w.method.config_json, label=w.label, length=w.case.length, depth=w.case.depth,
              sample=w.case.sample, score=score, metrics=metrics, seconds=seconds,
              cache=cache.cache.name if cache else "", cache_config=cache.cache.config_json if cache else "",
              budget=cache.budget.text if cache and cache.budget else "")
    store.add(row)
    outcome.measured += 1
    outcome.summary.setdefault((w.spec.name, w.label), []).append(score)
    return row


def _describe(w: Work) -> str:
    depth = "" if w.case.depth is None else f" depth={w.case.depth:.0%}"
    variant = "" if w.case.variant == "default" else f" {w.case.variant}"
    return f"{w.spec.name}{variant} L={w.case.length}{depth} #{w.case.sample} {w.label}"


def _score_text(task: str, scores: list) -> str:
    vals = [s for s in scores if s is not None]
    if not vals:
        return "-"
    name = TASKS[task].score_name if task in TASKS else "score"
    return f"{name}={sum(vals) / len(vals):.4g}"


def summary_table(outcome: Outcome) -> Any:
    from rich.table import Table

    table = Table(title="live summary (mean headline score)", expand=False)
    for col in ("task", "method", "rows", "mean"):
        table.add_column(col)
    for (task, label), scores in sorted(outcome.summary.items()):
        table.add_row(task, label, str(len(scores)), _score_text(task, scores))
    notes = []
    if outcome.failed:
        notes.append(f"{outcome.failed} failed (see the errors table; retried on the next run)")
    if outcome.not_compared:
        notes.append(f"{outcome.not_compared} not compared: `full` fails those cases (where_full_succeeds)")
    if notes:
        table.caption = "; ".join(notes)
    return table


def _run_live(store: Store, ctx: Context, cfg: BenchConfig, todo: list[Work], outcome: Outcome, console: Any) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.description}"), console=console)
    job = bar.add_task("", total=outcome.total, completed=outcome.skipped)
    with Live(Group(bar, summary_table(outcome)), console=console, refresh_per_second=4) as live:
        for w in todo:
            bar.update(job, description=_describe(w))
            _one(store, ctx, cfg, w, outcome)
            bar.advance(job)
            live.update(Group(bar, summary_table(outcome)))
    console.print(f"results: {store.path}")


def _run_plain(store: Store, ctx: Context, cfg: BenchConfig, todo: list[Work], outcome: Outcome, console: Any) -> None:
    if outcome.skipped:
        console.print(f"attnkit bench: resuming, {outcome.skipped} of {outcome.total} results already stored")
    n = outcome.skipped
    for w in todo:
        skip = not_compared(store, cfg, w)
        row = _one(store, ctx, cfg, w, outcome)
        n += 1
        if skip is not None:
            result = skip
        elif row is None:
            result = "FAILED (see errors table)"
        else:
            metric = TASKS[w.spec.name].score_name
            result = f"{metric}={row.score:.4g}" if row.score is not None else "no score"
            result += f" ({row.seconds:.1f}s)"
        console.print(f"[{n}/{outcome.total}] {_describe(w)}: {result}", highlight=False, markup=False, soft_wrap=True)
    console.print(summary_table(outcome))
    console.print(f"results: {store.path}")


def errors(run_dir: str | Path) -> list[dict[str, Any]]:
    """Failed measurements of a run directory (latest last)."""
    with Store(run_dir) as store:
        cur = store.conn.execute("SELECT key, task, label, error, created FROM errors ORDER BY id")
        return [dict(zip(("key", "task", "label", "error", "created"), r)) for r in cur.fetchall()]


def to_json(outcome: Outcome) -> str:
    """One JSON line with the counts (for scripts)."""
    return json.dumps({"run_dir": str(outcome.run_dir), "total": outcome.total, "skipped": outcome.skipped,
                       "measured": outcome.measured, "failed": outcome.failed,
                       "not_compared": outcome.not_compared,
                       "seconds": round(outcome.seconds, 2)})
