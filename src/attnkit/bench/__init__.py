"""The attnkit benchmark: tasks x methods x lengths on a real model, stored in SQLite.

- ``spec``: the data model (BenchConfig, TaskSpec, MethodSpec, CacheSpec, Budget, CacheRun);
- ``parse``: method strings like ``streaming(sink=4,window=256)``, KV-cache settings
  (``parse_caches("snapkv(window=64),tova")``, ``parse_budgets("512,25%")``), lengths,
  depths, YAML / TOML files;
- ``build``: presets, command-line overrides, ``build_config(dict) -> BenchConfig``;
- ``tasks``: the task contract (``tasks/base.py``), the registry (``TASKS``,
  ``@register_task``) and one file per task, each declaring its report section;
- ``runner.run(cfg, run_dir)``: measure what is missing, commit each row at once;
- ``store``: the SQLite database of a run directory;
- ``report.write(run_dir)``: ``report.md`` and a self-contained ``report.html``, one
  section per task (``Task.section``).

See docs/benchmark.md.
"""

from __future__ import annotations

from .build import PRESETS, build_config
from .parse import parse_budgets, parse_caches, parse_method, parse_methods
from .spec import BenchConfig, Budget, CacheRun, CacheSpec, MethodSpec, TaskSpec
from .store import Row, Store
from .tasks import TASKS, Case, Column, Context, Section, Task, register_task

__all__ = [
    "PRESETS",
    "TASKS",
    "BenchConfig",
    "Budget",
    "CacheRun",
    "CacheSpec",
    "Case",
    "Column",
    "Context",
    "MethodSpec",
    "Row",
    "Section",
    "Store",
    "Task",
    "TaskSpec",
    "build_config",
    "parse_budgets",
    "parse_caches",
    "parse_method",
    "parse_methods",
    "register_task",
]
