"""Benchmark tasks: one file per task, each registered with ``@register_task``.

The contract (``Task``, ``Case``, ``Context``, ``Section``) is in ``base.py``; this
package imports every module in its folder, so a new task is one new file here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

from .base import TASKS, Case, Column, Context, Section, Task, case_seed, register_task

__all__ = ["TASKS", "Case", "Column", "Context", "Section", "Task", "case_seed", "discover", "register_task"]


def discover(package: str, path: Iterable[str]) -> list[str]:
    """Import every public module of ``package`` (found on ``path``), so that their
    ``@register_task`` classes join ``TASKS``; returns the module names imported."""
    names = [f"{package}.{m.name}" for m in pkgutil.iter_modules(list(path)) if not m.name.startswith("_")]
    for name in names:
        importlib.import_module(name)
    return names


discover(__name__, __path__)
