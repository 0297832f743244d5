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

Every error names the bad field and what is allowed. Method names and configs are
validated by ``attnkit.get`` before anything runs.
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
TOP_KEYS = ("model", "methods", "tasks", "lengths", "depths", "samples", "seed", "threads")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class MethodSpec:
    """A registered attention method and its config fields, e.g. streaming(sink=4, window=256)."""

    name: str
    config: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.config)

    @property
    def label(self) -> str:
        """``name`` or ``name(field=value,...)``: the form ``parse_methods`` reads back."""
        if not self.config:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={_fmt(v)}" for k, v in self.config) + ")"

    @property
    def config_json(self) -> str:
        return json.dumps(self.kwargs, sort_keys=True)


@dataclass
class TaskSpec:
    """One task of a run: where it is measured and its own parameters (``Task.Params``)."""

    name: str
    lengths: list[int]
    depths: list[float]
    samples: int
    methods: list[MethodSpec]
    params: Any = None  # an instance of the task's Params dataclass


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
    """Split on ``sep`` outside parentheses, brackets and quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
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


def parse_method(text: str) -> MethodSpec:
    """``"streaming(sink=4, window=256)"`` -> MethodSpec, validated by ``attnkit.get``."""
    match = _METHOD_RE.match(text)
    if not match:
        raise ValueError(f"cannot read method {text!r}: write NAME or NAME(field=value, ...), "
                         "e.g. streaming(sink=4,window=256)")
    name, inner = match.group(1), match.group(2)
    config: dict[str, Any] = {}
    for part in _split_top(inner or ""):
        if "=" not in part:
            raise ValueError(f"method {text!r}: config entry {part!r} is not field=value")
        key, value = part.split("=", 1)
        config[key.strip()] = parse_value(value)
    return method_spec(name, config)


def method_spec(name: str, config: Mapping[str, Any]) -> MethodSpec:
    """Validate ``name`` and ``config`` with ``attnkit.get`` (errors list the valid choices)."""
    from .. import api, registry

    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    api.get(name, **config)
    kinds = registry.method_info(name).kinds
    if "prefill" not in kinds:
        prefill = [m.name for m in registry.methods(kind="prefill")]
        raise ValueError(f"method {name!r} is a KV-cache policy (kinds {list(kinds)}); the benchmark runs prefill "
                         f"methods: {', '.join(prefill)}")
    return MethodSpec(name, tuple(sorted(config.items())))


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
    for name, section in tasks_data.items():
        if name not in TASKS:
            raise ValueError(f"tasks: unknown {name!r}; allowed: {', '.join(sorted(TASKS))}")
        section = dict(section or {})
        common = {k: section.pop(k) for k in COMMON_TASK_KEYS if k in section}
        tasks.append(TaskSpec(
            name=name,
            lengths=parse_lengths(common["lengths"]) if "lengths" in common else list(top_lengths),
            depths=parse_depths(common["depths"]) if "depths" in common else list(top_depths),
            samples=_positive_int(f"tasks.{name}.samples", common["samples"]) if "samples" in common else top_samples,
            methods=parse_methods(common["methods"]) if "methods" in common else list(top_methods),
            params=_task_params(TASKS[name], name, section),
        ))
    if not tasks:
        raise ValueError(f"tasks: the list is empty; allowed: {', '.join(sorted(TASKS))}")
    threads = data.get("threads")
    return BenchConfig(
        model=str(data.get("model", "smollm2-135m")),
        tasks=tasks,
        seed=int(data.get("seed", 0)),
        threads=None if threads is None else _positive_int("threads", threads),
    )


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
) -> dict[str, Any]:
    """Command-line options override a preset / file: top-level values, and per-task
    values too (``--lengths`` applies to every task)."""
    from .tasks import TASKS

    data = json.loads(json.dumps(data))  # deep copy
    tasks_data = data.get("tasks", {})
    if isinstance(tasks_data, (list, str)):
        names = parse_names(tasks_data, "tasks", sorted(TASKS)) if isinstance(tasks_data, str) else tasks_data
        tasks_data = {n: {} for n in names}
    if tasks is not None:
        names = parse_names(tasks, "--tasks", sorted(TASKS))
        tasks_data = {n: tasks_data.get(n, {}) for n in names}
    overrides = {"methods": methods, "lengths": lengths, "depths": depths, "samples": samples}
    for key, value in overrides.items():
        if value is None:
            continue
        data[key] = value
        for section in tasks_data.values():
            if isinstance(section, dict):
                section.pop(key, None)
    if tasks_data:
        data["tasks"] = tasks_data
    if model is not None:
        data["model"] = model
    if seed is not None:
        data["seed"] = seed
    return data
