"""The data model of a benchmark run: which methods, KV-cache settings and tasks.

``BenchConfig`` holds one ``TaskSpec`` per task; a task measures every ``MethodSpec``
(and, for tasks that decode, every ``CacheRun``: a ``CacheSpec`` at a ``Budget``).
``attnkit.bench.parse`` reads these from strings and files, ``attnkit.bench.build``
assembles a whole run (presets, command-line overrides).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..registry import policy_class

# The shape of a config file (see attnkit.bench.build).
COMMON_TASK_KEYS = ("lengths", "depths", "samples", "methods")
CACHE_TASK_KEYS = ("caches", "budgets")  # also accepted by tasks that decode with a KV cache
TOP_KEYS = ("model", "methods", "caches", "budgets", "tasks", "lengths", "depths", "samples", "seed", "threads",
            "where_full_succeeds")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MODEL_FIELDS = ("dense_layers",)  # method-spec fields for the model patch, not the method



@dataclass(frozen=True)
class MethodSpec:
    """A registered attention method and its config fields, e.g. streaming(sink=4, window=256)."""

    name: str
    config: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        """Config fields plus ``dense_layers`` (for ``attnkit.patch``)."""
        return dict(self.config)

    @property
    def method_config(self) -> dict[str, Any]:
        """The method's own config fields (for ``attnkit.attention``)."""
        return {k: v for k, v in self.config if k not in MODEL_FIELDS}

    @property
    def dense_layers(self) -> int:
        """How many first layers keep exact attention in model tasks (0: none)."""
        return int(dict(self.config).get("dense_layers", 0))

    @property
    def label(self) -> str:
        """``name`` or ``name(field=value,...)``: the form ``parse_methods`` reads back."""
        if not self.config:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={_fmt(v)}" for k, v in self.config) + ")"

    @property
    def config_json(self) -> str:
        return json.dumps(self.kwargs, sort_keys=True)


@dataclass(frozen=True)
class Budget:
    """A KV-cache budget: ``tokens`` kept per KV head and layer (``"512"``), or ``keep``
    percent of the prompt kept (``"25%"`` = ``KVCache(ratio=0.75)``, kvpress's
    ``compression_ratio``). ``text`` is the canonical form, part of a result's key."""

    text: str
    tokens: int | None = None
    keep: float | None = None  # percent kept, 0 < keep < 100

    @property
    def kvcache_kwargs(self) -> dict[str, Any]:
        if self.tokens is not None:
            return {"budget": self.tokens}
        return {"ratio": round(1 - self.keep / 100, 12)}


@dataclass(frozen=True)
class CacheSpec:
    """A KV-cache policy and its config fields, e.g. snapkv(window=64,kernel=5,pooling="avg")."""

    name: str
    config_json: str = "{}"  # canonical JSON (sorted keys): part of a result's key

    @property
    def kwargs(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    @property
    def label(self) -> str:
        """``name`` or ``name(field=value,...)``: the form ``parse_caches`` reads back."""
        config = self.kwargs
        if not config:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={_fmt(v)}" for k, v in sorted(config.items())) + ")"

    @property
    def uses_budget(self) -> bool:
        return _policy_takes_budget(self.name, self.kwargs)


@dataclass(frozen=True)
class CacheRun:
    """One cache setting a case is decoded with: a policy at a budget (None: no budget)."""

    cache: CacheSpec
    budget: Budget | None = None

    @property
    def label(self) -> str:
        return self.cache.label if self.budget is None else f"{self.cache.label}@{self.budget.text}"

    @property
    def kvcache_kwargs(self) -> dict[str, Any]:
        return {**(self.budget.kvcache_kwargs if self.budget is not None else {}), **self.cache.kwargs}

    def make(self) -> Any:
        """A fresh ``attnkit.KVCache`` of this setting."""
        from ..kvcache import KVCache

        return KVCache(policy=self.cache.name, **self.kvcache_kwargs)


def run_label(method: MethodSpec, cache: CacheRun | None) -> str:
    """What a result is called in summaries: the method, then the cache setting if any
    (``snapkv@25%``; ``streaming(window=256) + snapkv@512`` with a prefill method)."""
    if cache is None:
        return method.label
    return cache.label if method.label == "full" else f"{method.label} + {cache.label}"


@dataclass
class TaskSpec:
    """One task of a run: where it is measured and its own parameters (``Task.Params``).

    ``caches`` x ``budgets``: KV-cache settings (tasks that decode only); every case is
    also measured with the normal cache (the ``full`` baseline)."""

    name: str
    lengths: list[int]
    depths: list[float]
    samples: int
    methods: list[MethodSpec]
    params: Any = None  # an instance of the task's Params dataclass
    caches: list[CacheSpec] = field(default_factory=list)
    budgets: list[Budget] = field(default_factory=list)

    def cache_runs(self) -> list[CacheRun | None]:
        """None (the normal cache) first, then every (policy x budget); a policy without
        a budget (``quantized``) once."""
        runs: list[CacheRun | None] = [None]
        for cache in self.caches:
            if cache.uses_budget:
                runs += [CacheRun(cache, b) for b in self.budgets]
            else:
                runs.append(CacheRun(cache))
        return runs


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    tasks: list[TaskSpec] = field(default_factory=list)
    seed: int = 0
    threads: int | None = None
    # Measure the other methods / cache settings of a scored task (``Task.pass_mark``) only
    # on the cases where `full` with the normal cache reaches the pass mark: a comparison
    # on a case exact attention fails says nothing about the method (issue 17).
    where_full_succeeds: bool = False

    def methods(self) -> list[MethodSpec]:
        """Every distinct method of the run, in first-seen order."""
        seen: dict[MethodSpec, None] = {}
        for t in self.tasks:
            for m in t.methods:
                seen.setdefault(m, None)
        return list(seen)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "seed": self.seed,
            "threads": self.threads,
            **({"where_full_succeeds": True} if self.where_full_succeeds else {}),
            "tasks": {
                t.name: {
                    "lengths": t.lengths,
                    "depths": t.depths,
                    "samples": t.samples,
                    "methods": [m.label for m in t.methods],
                    **({"caches": [c.label for c in t.caches]} if t.caches else {}),
                    **({"budgets": [b.text for b in t.budgets]} if t.budgets else {}),
                    **(dataclasses.asdict(t.params) if t.params is not None else {}),
                }
                for t in self.tasks
            },
        }


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return repr(value)


def _policy_takes_budget(name: str, config: Mapping[str, Any]) -> bool:
    """Whether the KV-cache policy ``name`` with ``config`` keeps a budget of tokens
    (``quantized`` does not). ``config`` may hold ``KVCache``'s own fields (``when``,
    ``interval``, ``layout``, ``kv_bits``): they are not the policy's."""
    own = _cache_fields()
    return policy_class(name)(**{k: v for k, v in config.items() if k not in own}).has_budget()


def _cache_fields() -> frozenset[str]:
    """The keyword fields of ``attnkit.KVCache`` other than the policy, its budget and config."""
    import inspect

    from ..kvcache import KVCache  # transformers: loaded only when a cache is named

    params = inspect.signature(KVCache.__init__).parameters
    return frozenset(n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD) - {"self", "policy", "budget",
                                                                                          "ratio"}
