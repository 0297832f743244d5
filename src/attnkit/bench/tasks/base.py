"""The task contract: ``Task`` (what a task measures), ``Case`` (one measurement point),
``Context`` (what tasks share during a run), ``Section`` (how the report shows a task),
and the registry ``TASKS`` that ``@register_task`` fills.

A task is a class with

- ``Params``: a dataclass of its own settings (all with defaults; a config file's
  ``tasks.NAME`` section sets them, unknown fields are errors; an optional ``check()``
  validates them);
- ``cases(spec, seed)``: the seeded cases to measure, each a ``Case`` (variant, length,
  depth, sample); the same case is measured with every method;
- ``measure(ctx, case, method, spec) -> dict``: run one case with one method and return
  its metrics; the entry ``"score"`` is the headline number the report and summary use;
- ``score_name`` / ``higher_is_better``: what the score is and which way is better
  (the report's headline table and best-of use them); ``pass_mark``: the score at which
  a case counts as solved, for accuracy tasks (``where_full_succeeds`` uses it);
- ``section``: its report section (a ``Section``: heading, layout, columns, figures).

``uses_cache = True`` tasks decode, and are also measured with KV-cache settings
(``--cache POLICY --budgets ...``): ``measure`` then gets ``cache=`` a
``spec.CacheRun`` (``cache.make()`` is a fresh ``attnkit.KVCache``); without it, the
normal cache (the ``full`` baseline).

``needs_model = False`` tasks run without loading a model (tests use such fake tasks).
Adding a task is one file in this folder: the package imports every module in it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, TypeVar

from ..spec import MethodSpec, TaskSpec


class Column(NamedTuple):
    """One metric column of a task's table: the metric key, its header, significant digits."""

    metric: str
    header: str
    digits: int = 3


@dataclass(frozen=True)
class Section:
    """How the report shows a task.

    ``layout`` picks a renderer of ``attnkit.bench.report.layouts.LAYOUTS``: ``"table"``
    (any task: a table of ``columns`` per method, variant and length, figures
    ``"vs_length"``), ``"retrieval"`` (accuracy by depth; figures ``"heatmap"``,
    ``"vs_depth"``), ``"fidelity"`` (figure ``"error_vs_density"``), ``"speed"``
    (figure ``"vs_length"``) or ``"kv_decode"``. Tasks with the same layout and title
    share one section. ``order`` places the section in the report (ascending)."""

    title: str = ""  # the section heading; empty: the task's name
    layout: str = "table"
    intro: str = ""  # a paragraph under the heading
    table_title: str = ""  # empty: "<score name> by method, variant and length"
    note: str = ""  # a note under the table title
    columns: tuple[Column, ...] = ()  # empty: the task's score
    variant_header: str = "variant"
    figures: tuple[str, ...] = ()
    order: float = 60.0

PASS_MARK = 0.5  # `full` "succeeds" on a case of an accuracy task when it scores at least this


@dataclass(frozen=True)
class Case:
    """One measurement point of a task (method aside)."""

    variant: str
    length: int
    depth: float | None
    sample: int
    seed: int  # the generator seed of this case: same prompt for every method


@dataclass
class Context:
    """What tasks share during a run: the model (loaded on first use) and a memo dict."""

    model_name: str
    seed: int = 0
    progress: bool = False
    memo: dict[Any, Any] = field(default_factory=dict)
    _lm: Any = None

    @property
    def lm(self) -> Any:
        """The ``attnkit.models.LoadedModel`` of the run."""
        if self._lm is None:
            from ... import models

            self._lm = models.load(self.model_name, progress=self.progress)
        return self._lm


class Task:
    """Base class of tasks (see the module docstring)."""

    name: ClassVar[str]
    needs_model: ClassVar[bool] = True
    uses_depth: ClassVar[bool] = False
    uses_cache: ClassVar[bool] = False  # measure(..., cache=CacheRun) for KV-cache settings
    score_name: ClassVar[str] = "score"
    higher_is_better: ClassVar[bool] = True
    # The score at which a case counts as solved (RULER-style accuracy tasks: PASS_MARK);
    # None: the score is not a pass / fail accuracy (speed, fidelity, perplexity).
    pass_mark: ClassVar[float | None] = None
    section: ClassVar[Section] = Section()

    @dataclass
    class Params:
        pass

    def variants(self, spec: TaskSpec) -> list[str]:
        return ["default"]

    def cases(self, spec: TaskSpec, seed: int) -> Iterator[Case]:
        for variant in self.variants(spec):
            for length in spec.lengths:
                for depth in (spec.depths if self.uses_depth else [None]):
                    for sample in range(spec.samples):
                        yield Case(variant, length, depth, sample,
                                   case_seed(seed, self.name, variant, length, depth, sample))

    def measure(self, ctx: Context, case: Case, method: MethodSpec, spec: TaskSpec) -> dict[str, Any]:
        raise NotImplementedError


def case_seed(*parts: Any) -> int:
    """A stable 31-bit seed from the parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


TASKS: dict[str, type[Task]] = {}

T = TypeVar("T", bound=type)


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: make a Task available to ``attnkit bench --tasks NAME``."""

    def decorate(cls: T) -> T:
        cls.name = name
        TASKS[name] = cls
        return cls

    return decorate
