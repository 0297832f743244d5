"""What a benchmark run measures: models, tasks, methods, lengths, depths, samples.

A run is described by a ``BenchConfig``, built from command-line strings, a preset
(``--quick``) or a YAML / TOML file of the same shape::

    model: smollm2-135m
    methods: ["full", "streaming(sink=4, window=256)"]    # or {name: streaming, sink: 4}
    lengths: [1k, 2k]          # defaults for every task
    samples: 2
    tasks:
      niah: {depths: [0, 0.5, 1.0], variants: [single]}
      fidelity: {lengths: [2k], layers: [0, 15]}
    caches: ["snapkv(window=64,kernel=5,pooling=\"avg\")", tova]   # KV-cache policies
    budgets: [128, 512, "25%"]     # tokens kept per KV head and layer, or % of the prompt

Every error names the bad field and what is allowed. Method names and configs are
validated by ``attnkit.get`` before anything runs, cache policies by ``attnkit.KVCache``.
Tasks that decode (``Task.uses_cache``) run every case with the normal cache (the
``full`` baseline) and with every (cache policy x budget).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

# Keys every task section accepts besides the task's own ``Params`` fields.
COMMON_TASK_KEYS = ("lengths", "depths", "samples", "methods")
CACHE_TASK_KEYS = ("caches", "budgets")  # also accepted by tasks that decode with a KV cache
TOP_KEYS = ("model", "methods", "caches", "budgets", "tasks", "lengths", "depths", "samples", "seed", "threads")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


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
        from ..registry import policy_class

        return policy_class(self.name)(**self.kwargs).has_budget()


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
    threads: Optional[int] = None

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


# --- strings -------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return repr(value)


def parse_value(text: str) -> Any:
    """A config value from the command line: int, float, bool, None, list, or a string."""
    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1]
    return text


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside parentheses, brackets, braces and quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in {text!r}")
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if depth != 0 or quote:
        raise ValueError(f"unbalanced parentheses or quotes in {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


_METHOD_RE = re.compile(r"^\s*([A-Za-z_][\w\-]*)\s*(?:\((.*)\))?\s*$", re.S)


MODEL_FIELDS = ("dense_layers",)  # method-spec fields for the model patch, not the method


def parse_method(text: str) -> MethodSpec:
    """``"streaming(sink=4, window=256)"`` -> MethodSpec, validated by ``attnkit.get``."""
    return method_spec(*_read_call(text, "method"))


def method_spec(name: str, config: Mapping[str, Any]) -> MethodSpec:
    """Validate ``name`` and ``config`` with ``attnkit.get`` (errors list the valid choices).

    ``dense_layers=N`` (not a method field) keeps the first N layers exact in every task
    (``attnkit.patch(..., dense_layers=N)``; in ``fidelity``, layers below N run ``full``).
    """
    from .. import api, registry

    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    dense = config.get("dense_layers", 0)
    if isinstance(dense, bool) or not isinstance(dense, int) or dense < 0:
        raise ValueError(f"dense_layers of {name!r} must be an integer >= 0 (the first layers kept exact), got {dense!r}")
    if dense == 0:
        config.pop("dense_layers", None)
    api.get(name, **{k: v for k, v in config.items() if k not in MODEL_FIELDS})
    kinds = registry.method_info(name).kinds
    if "prefill" not in kinds:
        prefill = [m.name for m in registry.methods(kind="prefill")]
        raise ValueError(f"method {name!r} is a KV-cache policy (kinds {list(kinds)}); --methods / methods: take "
                         f"prefill methods ({', '.join(prefill)}); pass cache policies with --cache {name} "
                         "--budgets 512,25% (caches: / budgets: in a config file)")
    return MethodSpec(name, tuple(sorted(config.items())))


def _read_call(text: str, what: str) -> tuple[str, dict[str, Any]]:
    """``"name(field=value, ...)"`` -> (name, {field: value})."""
    match = _METHOD_RE.match(text)
    if not match:
        example = "snapkv(window=64,kernel=5)" if what == "cache policy" else "streaming(sink=4,window=256)"
        raise ValueError(f"cannot read {what} {text!r}: write NAME or NAME(field=value, ...), e.g. {example}")
    name, inner = match.group(1), match.group(2)
    config: dict[str, Any] = {}
    for part in _split_top(inner or ""):
        if "=" not in part:
            raise ValueError(f"{what} {text!r}: config entry {part!r} is not field=value")
        key, value = part.split("=", 1)
        config[key.strip()] = parse_value(value)
    return name, config


def parse_cache(text: str) -> CacheSpec | None:
    """``'snapkv(window=64,pooling="avg")'`` -> CacheSpec, validated by ``attnkit.KVCache``;
    ``"full"`` (the normal cache, always measured) -> None."""
    return cache_spec(*_read_call(text, "cache policy"))


def cache_spec(name: str, config: Mapping[str, Any]) -> CacheSpec | None:
    """Validate a cache policy ``name`` and its fields (errors list the valid choices)."""
    from .. import registry
    from ..kvcache import KVCache

    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    if name == "full":
        if config:
            raise ValueError("caches: 'full' is the normal cache (always measured as the baseline); it has no fields")
        return None
    try:
        cls = registry.policy_class(name)
    except ValueError as exc:
        hint = ""
        if name in {m.name for m in registry.methods(kind="prefill")}:
            hint = f" ({name!r} is a prefill method: pass it with --methods)"
        raise ValueError(f"--cache / caches: {exc}{hint}; 'full' (the normal cache) is always measured") from None
    for key in ("budget", "ratio"):
        if key in config:
            raise ValueError(f"cache policy {name!r}: give budgets with --budgets (budgets: in a config file), "
                             f"not as the field {key!r}; e.g. --cache {name} --budgets 512,25%")
    KVCache(policy=name, budget=1 if cls(**config).has_budget() else None, **config)  # unknown fields, bad values
    return CacheSpec(name, json.dumps(config, sort_keys=True))


def parse_caches(text: str | list) -> list[CacheSpec]:
    """``"snapkv(window=64),tova"`` or a list of strings / {name: ..., field: ...}; ``full``
    is dropped (the baseline is always measured); duplicates are dropped."""
    items = _split_top(text) if isinstance(text, str) else list(text)
    out: list[CacheSpec] = []
    for item in items:
        if isinstance(item, CacheSpec):
            spec: CacheSpec | None = item
        elif isinstance(item, str):
            spec = parse_cache(item)
        elif isinstance(item, Mapping):
            item = dict(item)
            if "name" not in item:
                raise ValueError(f"caches: entry {item!r} needs a 'name' (a KV-cache policy)")
            name = item.pop("name")
            spec = cache_spec(name, item)
        else:
            raise ValueError(  # noqa: TRY004 - a config value, reported like every config error
                f"caches: entry {item!r} must be a string like 'snapkv(window=64)' or a mapping")
        if spec is not None and spec not in out:
            out.append(spec)
    return out


_BUDGET_HELP = ("write tokens kept per KV head and layer as a positive integer (512, 1k) or the share of the "
                "prompt kept as a percentage strictly between 0% and 100% (25%, 12.5%)")


def parse_budget(value: Any) -> Budget:
    """``512`` / ``"1k"`` -> tokens kept; ``"25%"`` -> 25% of the prompt kept."""
    if isinstance(value, Budget):
        return value
    if isinstance(value, (bool, float)):  # 0.25 would be ambiguous: write 25%
        raise ValueError(f"budgets: {value!r} is not a budget; {_BUDGET_HELP}")  # noqa: TRY004 - config value
    text = str(value).strip().lower()
    if text.endswith("%"):
        try:
            keep = float(text[:-1])
        except ValueError:
            raise ValueError(f"budgets: {value!r} is not a budget; {_BUDGET_HELP}") from None
        if not 0 < keep < 100:
            raise ValueError(f"budgets: {value!r} is outside (0%, 100%); {_BUDGET_HELP}")
        return Budget(f"{keep:g}%", keep=keep)
    try:
        tokens = float(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise ValueError(f"budgets: {value!r} is not a budget; {_BUDGET_HELP}") from None
    if tokens != int(tokens) or tokens < 1:
        raise ValueError(f"budgets: {value!r} is not a positive number of tokens; {_BUDGET_HELP}")
    return Budget(str(int(tokens)), tokens=int(tokens))


def parse_budgets(value: Any) -> list[Budget]:
    items = _split_top(value) if isinstance(value, str) else list(value)
    out: list[Budget] = []
    for item in items:
        budget = parse_budget(item)
        if budget not in out:
            out.append(budget)
    if not out:
        raise ValueError(f"budgets: the list is empty; {_BUDGET_HELP}")
    return out


def parse_methods(text: str | list) -> list[MethodSpec]:
    """``"full,streaming(sink=4,window=256)"`` or a list of strings / {name: ..., field: ...}."""
    items = _split_top(text) if isinstance(text, str) else list(text)
    out = []
    for item in items:
        if isinstance(item, MethodSpec):
            out.append(item)
        elif isinstance(item, str):
            out.append(parse_method(item))
        elif isinstance(item, Mapping):
            item = dict(item)
            if "name" not in item:
                raise ValueError(f"methods: entry {item!r} needs a 'name' (a registered method)")
            name = item.pop("name")
            out.append(method_spec(name, item))
        else:
            raise ValueError(f"methods: entry {item!r} must be a string like 'streaming(window=256)' or a mapping")
    if not out:
        raise ValueError("methods: the list is empty; name at least one method, e.g. full")
    return out


def parse_length(value: Any) -> int:
    """``2048``, ``"2k"`` (= 2048), ``"1.5k"`` (= 1536) -> tokens."""
    if isinstance(value, bool):
        raise ValueError(f"lengths: {value!r} is not a length; write e.g. 2048 or 2k")
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip().lower()
        try:
            n = round(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
        except ValueError:
            raise ValueError(f"lengths: {value!r} is not a length; write tokens like 2048 or 2k, 1.5k") from None
    if n < 16:
        raise ValueError(f"lengths: {value!r} is too short; lengths must be >= 16 tokens")
    return n


def parse_lengths(value: Any) -> list[int]:
    items = _split_top(value) if isinstance(value, str) else list(value)
    return [parse_length(v) for v in items]


def parse_depths(value: Any) -> list[float]:
    """Depths as fractions 0..1 or percentages ``"0,50%,100%"`` / ``[0, 50, 100]`` when any > 1."""
    items = _split_top(value) if isinstance(value, str) else list(value)
    out = []
    percent = False
    for v in items:
        text = str(v).strip()
        if text.endswith("%"):
            percent, text = True, text[:-1]
        try:
            out.append(float(text))
        except ValueError:
            raise ValueError(f"depths: {v!r} is not a number; write fractions 0..1 or percentages like 50%") from None
    if percent or any(d > 1 for d in out):
        out = [d / 100 for d in out]
    for d in out:
        if not 0 <= d <= 1:
            raise ValueError(f"depths: {d!r} is outside 0..1 (0% = start of the context, 100% = just before the question)")
    return out


def parse_names(value: Any, what: str, allowed: list[str]) -> list[str]:
    items = _split_top(value) if isinstance(value, str) else list(value)
    for item in items:
        if item not in allowed:
            raise ValueError(f"{what}: unknown {item!r}; allowed: {', '.join(allowed)}")
    return items


# --- building a config ----------------------------------------------------------------


def _check_keys(where: str, given: Mapping[str, Any], allowed: tuple[str, ...] | list[str]) -> None:
    for key in given:
        if key not in allowed:
            raise ValueError(f"{where}: unknown field {key!r}; allowed fields: {', '.join(allowed)}")


def _task_params(task_cls: type, name: str, values: Mapping[str, Any]) -> Any:
    params_cls = task_cls.Params
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    for key in values:
        if key in CACHE_TASK_KEYS:
            raise ValueError(f"tasks.{name}: {key!r} applies only to tasks that decode with a KV cache: "
                             f"{', '.join(cache_tasks())}")
        if key not in fields:
            allowed = list(COMMON_TASK_KEYS) + list(fields)
            raise ValueError(f"tasks.{name}: unknown field {key!r}; allowed fields: {', '.join(allowed)}")
    params = params_cls(**dict(values))
    check = getattr(params, "check", None)
    if check is not None:
        check()
    return params


def build_config(data: Mapping[str, Any]) -> BenchConfig:
    """A BenchConfig from a dict of the YAML / TOML shape (see the module docstring)."""
    from .tasks import TASKS

    data = dict(data)
    _check_keys("config", data, TOP_KEYS)
    top_methods = parse_methods(data.get("methods", ["full"]))
    top_lengths = parse_lengths(data.get("lengths", ["2k"]))
    top_depths = parse_depths(data.get("depths", list(DEFAULT_DEPTHS)))
    top_samples = _positive_int("samples", data.get("samples", 1))
    tasks_data = data.get("tasks", ["niah"])
    if isinstance(tasks_data, str):
        tasks_data = {name: {} for name in parse_names(tasks_data, "tasks", sorted(TASKS))}
    elif isinstance(tasks_data, list):
        tasks_data = {name: {} for name in parse_names(tasks_data, "tasks", sorted(TASKS))}
    elif not isinstance(tasks_data, Mapping):
        raise ValueError("tasks: must be a list of task names or a mapping task -> settings")
    tasks = []
    top_caches = parse_caches(data["caches"]) if data.get("caches") is not None else []
    top_budgets = parse_budgets(data["budgets"]) if data.get("budgets") is not None else []
    if top_caches:
        _check_budgets("--cache / caches", top_caches, top_budgets)
    for name, section in tasks_data.items():
        if name not in TASKS:
            raise ValueError(f"tasks: unknown {name!r}; allowed: {', '.join(sorted(TASKS))}")
        section = dict(section or {})
        common = {k: section.pop(k) for k in COMMON_TASK_KEYS if k in section}
        spec = TaskSpec(
            name=name,
            lengths=parse_lengths(common["lengths"]) if "lengths" in common else list(top_lengths),
            depths=parse_depths(common["depths"]) if "depths" in common else list(top_depths),
            samples=_positive_int(f"tasks.{name}.samples", common["samples"]) if "samples" in common else top_samples,
            methods=parse_methods(common["methods"]) if "methods" in common else list(top_methods),
        )
        if TASKS[name].uses_cache:
            own = {k: section.pop(k) for k in CACHE_TASK_KEYS if k in section}
            spec.caches = parse_caches(own["caches"]) if own.get("caches") is not None else list(top_caches)
            spec.budgets = parse_budgets(own["budgets"]) if own.get("budgets") is not None else list(top_budgets)
            if not spec.caches and own.get("budgets") is None:
                spec.budgets = []  # budgets given for other tasks' caches
            if own:
                _check_budgets(f"tasks.{name}", spec.caches, spec.budgets)
        spec.params = _task_params(TASKS[name], name, section)
        tasks.append(spec)
    if not tasks:
        raise ValueError(f"tasks: the list is empty; allowed: {', '.join(sorted(TASKS))}")
    if (top_caches or top_budgets) and not any(TASKS[t.name].uses_cache for t in tasks):
        raise ValueError(f"caches / budgets (--cache, --budgets) apply to tasks that decode with a KV cache: "
                         f"{', '.join(cache_tasks())}; none of them is in tasks ({', '.join(t.name for t in tasks)})")
    if top_budgets and not any(t.caches for t in tasks):
        _check_budgets("config", [], top_budgets)
    threads = data.get("threads")
    return BenchConfig(
        model=str(data.get("model", "smollm2-135m")),
        tasks=tasks,
        seed=int(data.get("seed", 0)),
        threads=None if threads is None else _positive_int("threads", threads),
    )


def cache_tasks() -> list[str]:
    """Names of the tasks that decode with a KV cache (accept caches / budgets)."""
    from .tasks import TASKS

    return sorted(name for name, cls in TASKS.items() if cls.uses_cache)


def _check_budgets(where: str, caches: list[CacheSpec], budgets: list[Budget]) -> None:
    """Budgets need policies; policies that evict need budgets; ``quantized`` has none."""
    if budgets and not caches:
        raise ValueError(f"{where}: budgets (--budgets) were given without a cache policy; add --cache POLICY "
                         "(caches: in a config file), e.g. --cache snapkv --budgets 512,25%")
    for cache in caches:
        if cache.uses_budget and not budgets:
            raise ValueError(f"{where}: cache policy {cache.label!r} needs budgets: add --budgets (budgets: in a "
                             f"config file), e.g. --budgets 512,25%; {_BUDGET_HELP}")
        if not cache.uses_budget and budgets:
            raise ValueError(f"{where}: cache policy {cache.name!r} keeps every token (it compresses by another "
                             f"means, e.g. quantization) and has no budget, but budgets "
                             f"({', '.join(b.text for b in budgets)}) were given; run it in a separate invocation "
                             f"without --budgets (the same --out adds its rows to the same results)")
        for budget in budgets if cache.uses_budget else ():
            CacheRun(cache, budget).make()  # every (policy, budget) is accepted before anything runs


def _positive_int(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what}: {value!r} must be an integer >= 1")
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{what}: {value!r} must be an integer >= 1") from None
    if n < 1:
        raise ValueError(f"{what}: {value!r} must be an integer >= 1")
    return n


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a dict."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of fields; allowed fields: {', '.join(TOP_KEYS)}")
        return data
    raise ValueError(f"{path}: config files are .yaml, .yml or .toml")


# The preset of `make bench` / `attnkit bench --quick`: under 10 minutes on a 2-core CPU
# including the first model conversion (see docs/benchmark.md for measured times).
QUICK: dict[str, Any] = {
    "model": "smollm2-135m",
    "methods": ["full", "streaming(sink=4,window=256)", "sliding_window(window=256)"],
    "samples": 1,
    "tasks": {
        "niah": {"lengths": ["1.5k"], "depths": [0.0, 0.5, 1.0], "variants": ["single"]},
        "fidelity": {"lengths": ["2k"], "layers": [2, 15]},
        "perplexity": {"lengths": ["1k"]},
        "model_speed": {"lengths": [512, "1k"], "decode_tokens": 8},
    },
}

PRESETS = {"quick": QUICK}


def merge_cli(
    data: Mapping[str, Any],
    model: Optional[str] = None,
    tasks: Optional[str] = None,
    methods: Optional[str] = None,
    lengths: Optional[str] = None,
    depths: Optional[str] = None,
    samples: Optional[int] = None,
    seed: Optional[int] = None,
    caches: str | None = None,
    budgets: str | None = None,
    haystack: str | None = None,
) -> dict[str, Any]:
    """Command-line options override a preset / file: top-level values, and per-task
    values too (``--lengths`` applies to every task; ``--haystack`` to every task that
    has a haystack)."""
    from .tasks import TASKS

    data = json.loads(json.dumps(data))  # deep copy
    tasks_data = data.get("tasks", {})
    if isinstance(tasks_data, (list, str)):
        names = parse_names(tasks_data, "tasks", sorted(TASKS)) if isinstance(tasks_data, str) else tasks_data
        tasks_data = {n: {} for n in names}
    if tasks is not None:
        names = parse_names(tasks, "--tasks", sorted(TASKS))
        tasks_data = {n: tasks_data.get(n, {}) for n in names}
    overrides = {"methods": methods, "lengths": lengths, "depths": depths, "samples": samples, "caches": caches,
                 "budgets": budgets}
    for key, value in overrides.items():
        if value is None:
            continue
        data[key] = value
        for section in tasks_data.values():
            if isinstance(section, dict):
                section.pop(key, None)
    if haystack is not None:
        if not tasks_data:
            tasks_data = {"niah": {}}
        takes = [n for n in tasks_data if n in TASKS
                 and "haystack" in {f.name for f in dataclasses.fields(TASKS[n].Params)}]
        if not takes:
            raise ValueError(f"--haystack: none of the tasks ({', '.join(tasks_data)}) reads a haystack")
        for n in takes:
            tasks_data[n] = dict(tasks_data[n] or {}, haystack=haystack)
    if tasks_data:
        data["tasks"] = tasks_data
    if model is not None:
        data["model"] = model
    if seed is not None:
        data["seed"] = seed
    return data
