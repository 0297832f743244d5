"""Reading a benchmark config: method / cache strings, budgets, lengths, depths, files.

Every reader validates what it reads and raises a ValueError that names the field and
what is allowed: methods with ``attnkit.get``, cache policies with ``attnkit.KVCache``.
The command line (``attnkit bench``) and config files (YAML / TOML) share these readers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import api, registry
from .spec import MODEL_FIELDS, TOP_KEYS, Budget, CacheSpec, MethodSpec


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


_METHOD_RE = re.compile(r"^\s*([A-Za-z_][\w\-]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


def parse_method(text: str) -> MethodSpec:
    """``"streaming(sink=4, window=256)"`` -> MethodSpec, validated by ``attnkit.get``."""
    return method_spec(*_read_call(text, "method"))


def method_spec(name: str, config: Mapping[str, Any]) -> MethodSpec:
    """Validate ``name`` and ``config`` with ``attnkit.get`` (errors list the valid choices).

    ``dense_layers=N`` (not a method field) keeps the first N layers exact in every task
    (``attnkit.patch(..., dense_layers=N)``; in ``fidelity``, layers below N run ``full``).
    """
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
    from ..kvcache import KVCache  # transformers: loaded only when a cache is named

    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    if name == "full":
        if config:
            raise ValueError("caches: 'full' is the normal cache (always measured as the baseline); it has no fields")
        return None
    try:
        registry.policy_class(name)
    except ValueError as exc:
        hint = ""
        if name in {m.name for m in registry.methods(kind="prefill")}:
            hint = f" ({name!r} is a prefill method: pass it with --methods)"
        raise ValueError(f"--cache / caches: {exc}{hint}; 'full' (the normal cache) is always measured") from None
    for key in ("budget", "ratio"):
        if key in config:
            raise ValueError(f"cache policy {name!r}: give budgets with --budgets (budgets: in a config file), "
                             f"not as the field {key!r}; e.g. --cache {name} --budgets 512,25%")
    spec = CacheSpec(name, json.dumps(config, sort_keys=True))
    KVCache(policy=name, budget=1 << 30 if spec.uses_budget else None, **config)  # unknown fields, bad values
    return spec


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


BUDGET_HELP = ("write tokens kept per KV head and layer as a positive integer (512, 1k) or the share of the "
                "prompt kept as a percentage strictly between 0% and 100% (25%, 12.5%)")


def parse_budget(value: Any) -> Budget:
    """``512`` / ``"1k"`` -> tokens kept; ``"25%"`` -> 25% of the prompt kept."""
    if isinstance(value, Budget):
        return value
    if isinstance(value, (bool, float)):  # 0.25 would be ambiguous: write 25%
        raise ValueError(f"budgets: {value!r} is not a budget; {BUDGET_HELP}")  # noqa: TRY004 - config value
    text = str(value).strip().lower()
    if text.endswith("%"):
        try:
            keep = float(text[:-1])
        except ValueError:
            raise ValueError(f"budgets: {value!r} is not a budget; {BUDGET_HELP}") from None
        if not 0 < keep < 100:
            raise ValueError(f"budgets: {value!r} is outside (0%, 100%); {BUDGET_HELP}")
        return Budget(f"{keep:g}%", keep=keep)
    try:
        tokens = float(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise ValueError(f"budgets: {value!r} is not a budget; {BUDGET_HELP}") from None
    if tokens != int(tokens) or tokens < 1:
        raise ValueError(f"budgets: {value!r} is not a positive number of tokens; {BUDGET_HELP}")
    return Budget(str(int(tokens)), tokens=int(tokens))


def parse_budgets(value: Any) -> list[Budget]:
    items = _split_top(value) if isinstance(value, str) else list(value)
    out: list[Budget] = []
    for item in items:
        budget = parse_budget(item)
        if budget not in out:
            out.append(budget)
    if not out:
        raise ValueError(f"budgets: the list is empty; {BUDGET_HELP}")
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
            raise ValueError(  # noqa: TRY004 - a config value, reported like every config error
                f"methods: entry {item!r} must be a string like 'streaming(window=256)' or a mapping")
    if not out:
        raise ValueError("methods: the list is empty; name at least one method, e.g. full")
    return out


def parse_length(value: Any) -> int:
    """``2048``, ``"2k"`` (= 2048), ``"1.5k"`` (= 1536) -> tokens."""
    if isinstance(value, bool):
        raise ValueError(f"lengths: {value!r} is not a length; write e.g. 2048 or 2k")  # noqa: TRY004
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


def positive_int(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what}: {value!r} must be an integer >= 1")  # noqa: TRY004 - config value
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


