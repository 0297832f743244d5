"""``attnkit bench --dry-run``: the run plan of a validated ``BenchConfig``, printed
without loading a model or measuring anything.

    from attnkit.bench import build, dryrun
    cfg = build.build_config({"tasks": ["niah"], "methods": "full,streaming(window=256)"})
    print(dryrun.describe(cfg, "runs/demo"))

The plan is ``runner.plan`` (the same work list a run measures, in the same order), so
its counts and its first case are those of a real run; results already stored in the
run directory are counted as skipped (read-only: a dry run creates no files).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .runner import Work, plan
from .spec import BenchConfig, TaskSpec
from .store import stored_keys


def _task_lines(spec: TaskSpec, work: list[Work], done: set[str]) -> list[str]:
    """One task's counts: cases x methods (x cache settings) = measurements, already stored."""
    mine = [w for w in work if w.spec is spec]
    cases = len({(w.case.variant, w.case.length, w.case.depth, w.case.sample) for w in mine})
    caches = spec.cache_runs() if mine and mine[0].task.uses_cache else [None]
    cache_text = f" x {len(caches)} cache settings" if len(caches) > 1 else ""
    stored = sum(w.key in done for w in mine)
    lines = [f"task {spec.name}: {cases} cases x {len(spec.methods)} methods{cache_text} = {len(mine)} measurements, "
             f"{stored} already stored"]
    lines.append(f"  lengths: {', '.join(map(str, spec.lengths))}; samples: {spec.samples}")
    if mine and mine[0].task.uses_depth:
        lines.append(f"  depths: {', '.join(f'{d:g}' for d in spec.depths)}")
    lines.append(f"  methods: {', '.join(m.label for m in spec.methods)}")
    if len(caches) > 1:
        lines.append(f"  caches: {', '.join(c.label for c in spec.caches)}")
        lines.append(f"  budgets: {', '.join(b.text for b in spec.budgets) or '-'}")
        lines.append(f"  cache settings: {', '.join('full' if c is None else c.label for c in caches)}")
    if spec.params is not None:
        params = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(spec.params).items())
        lines.append(f"  params: {params or '-'}")
    return lines


def _first_case(work: list[Work]) -> list[str]:
    """The first case of the run in full: task, case fields and its method x cache settings."""
    if not work:
        return ["first case: none (the plan is empty)"]
    first = work[0]
    same = [w for w in work if w.spec is first.spec and w.case == first.case]
    case = dataclasses.asdict(first.case)
    lines = [f"first case: task {first.spec.name}, " + ", ".join(f"{k}={v!r}" for k, v in case.items())]
    lines += [f"  - {w.label}" for w in same]
    return lines


def describe(cfg: BenchConfig, run_dir: str | Path, max_cases: int | None = None) -> str:
    """The plan of ``cfg`` in ``run_dir`` as text (see the module docstring)."""
    work = plan(cfg, max_cases=max_cases)
    done = stored_keys(run_dir)
    stored = sum(w.key in done for w in work)
    lines = ["attnkit bench --dry-run: nothing is loaded or measured",
             f"model: {cfg.model}", f"seed: {cfg.seed}; threads: {cfg.threads or 'torch default'}",
             f"run directory: {run_dir} ({len(done)} results stored)",
             f"tasks: {', '.join(t.name for t in cfg.tasks)}"]
    if max_cases is not None:
        lines.append(f"max cases per task: {max_cases}")
    if cfg.where_full_succeeds:
        lines.append("where_full_succeeds: on accuracy tasks the other methods and cache settings run only on "
                     "the cases `full` solves (counted below as planned; decided as `full` scores them)")
    for spec in cfg.tasks:
        lines += _task_lines(spec, work, done)
    lines.append(f"total: {len(work)} measurements, {stored} already stored (skipped), {len(work) - stored} to run")
    return "\n".join(lines + _first_case(work))
