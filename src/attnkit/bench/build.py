"""Assembling a benchmark run: a config dict (file or preset) with command-line overrides
merged in, validated into a ``BenchConfig``.

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
from collections.abc import Mapping
from typing import Any

from .parse import (
    BUDGET_HELP,
    parse_budgets,
    parse_caches,
    parse_depths,
    parse_lengths,
    parse_methods,
    parse_names,
    positive_int,
)
from .spec import (
    CACHE_TASK_KEYS,
    COMMON_TASK_KEYS,
    DEFAULT_DEPTHS,
    TOP_KEYS,
    BenchConfig,
    Budget,
    CacheRun,
    CacheSpec,
    TaskSpec,
)
from .tasks import TASKS


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
    data = dict(data)
    _check_keys("config", data, TOP_KEYS)
    top_methods = parse_methods(data.get("methods", ["full"]))
    top_lengths = parse_lengths(data.get("lengths", ["2k"]))
    top_depths = parse_depths(data.get("depths", list(DEFAULT_DEPTHS)))
    top_samples = positive_int("samples", data.get("samples", 1))
    tasks_data = data.get("tasks", ["niah"])
    if isinstance(tasks_data, (str, list)):
        tasks_data = {name: {} for name in parse_names(tasks_data, "tasks", sorted(TASKS))}
    elif not isinstance(tasks_data, Mapping):
        raise ValueError("tasks: must be a list of task names or a mapping task -> settings")  # noqa: TRY004
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
            samples=positive_int(f"tasks.{name}.samples", common["samples"]) if "samples" in common else top_samples,
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
    where_full_succeeds = data.get("where_full_succeeds", False)
    if not isinstance(where_full_succeeds, bool):
        raise ValueError(f"where_full_succeeds: must be true or false, got {where_full_succeeds!r}")
    if where_full_succeeds:
        _check_full_listed(tasks)
    return BenchConfig(
        model=str(data.get("model", "smollm2-135m")),
        tasks=tasks,
        seed=int(data.get("seed", 0)),
        threads=None if threads is None else positive_int("threads", threads),
        where_full_succeeds=where_full_succeeds,
    )


def _check_full_listed(tasks: list[TaskSpec]) -> None:
    """``where_full_succeeds`` compares against `full` (default config): each scored task must
    measure it."""
    for t in tasks:
        if TASKS[t.name].pass_mark is not None and not any(m.name == "full" and m.config_json == "{}"
                                                             for m in t.methods):
            raise ValueError(f"where_full_succeeds: task {t.name!r} does not measure `full` (its methods: "
                             f"{', '.join(m.label for m in t.methods)}); add full to its methods or drop "
                             f"where_full_succeeds")


def cache_tasks() -> list[str]:
    """Names of the tasks that decode with a KV cache (accept caches / budgets)."""
    return sorted(name for name, cls in TASKS.items() if cls.uses_cache)


def _check_budgets(where: str, caches: list[CacheSpec], budgets: list[Budget]) -> None:
    """Budgets need policies; policies that evict need budgets; ``quantized`` has none."""
    if budgets and not caches:
        raise ValueError(f"{where}: budgets (--budgets) were given without a cache policy; add --cache POLICY "
                         "(caches: in a config file), e.g. --cache snapkv --budgets 512,25%")
    for cache in caches:
        if cache.uses_budget and not budgets:
            raise ValueError(f"{where}: cache policy {cache.label!r} needs budgets: add --budgets (budgets: in a "
                             f"config file), e.g. --budgets 512,25%; {BUDGET_HELP}")
        if not cache.uses_budget and budgets:
            raise ValueError(f"{where}: cache policy {cache.name!r} keeps every token (it compresses by another "
                             f"means, e.g. quantization) and has no budget, but budgets "
                             f"({', '.join(b.text for b in budgets)}) were given; run it in a separate invocation "
                             f"without --budgets (the same --out adds its rows to the same results)")
        for budget in budgets if cache.uses_budget else ():
            CacheRun(cache, budget).make()  # every (policy, budget) is accepted before anything runs



# The preset of `make bench` / `attnkit bench --quick`: Gemma 3 270M (32k context) at 16k
# tokens, where its 15 sliding-window layers make attnkit's exact path several times
# faster than transformers' (timed in the same run), with one sparse prefill method on
# the global layers and one KV-cache policy next to exact attention. About 15 minutes on
# a 2-core CPU including the first model conversion (docs/benchmark.md has the times).
QUICK: dict[str, Any] = {
    "model": "gemma3-270m",
    "methods": ["full", "vertical_slash"],
    "samples": 1,
    "tasks": {
        "model_speed": {"lengths": ["16k"], "decode_tokens": 4},
        "niah": {"lengths": ["16k"], "depths": [0.25, 0.75], "variants": ["niah_single_2"], "new_tokens": 12,
                 "caches": ["snapkv"], "budgets": ["10%"]},
    },
}

PRESETS = {"quick": QUICK}


def merge_cli(
    data: Mapping[str, Any],
    model: str | None = None,
    tasks: str | None = None,
    methods: str | None = None,
    lengths: str | None = None,
    depths: str | None = None,
    samples: int | None = None,
    seed: int | None = None,
    caches: str | None = None,
    budgets: str | None = None,
    haystack: str | None = None,
) -> dict[str, Any]:
    """Command-line options override a preset / file: top-level values, and per-task
    values too (``--lengths`` applies to every task; ``--haystack`` to every task that
    has a haystack)."""
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
