"""The method registry: a dict of name -> method class, filled by ``@register``.

A method is a config dataclass (its hyper-parameters with defaults) plus a class that
holds one config and computes attention. ``@register`` records the paper it comes from
and what it supports; ``attnkit.methods()`` and ``attnkit list`` read the registry.
The registry imports no method: importing ``attnkit`` registers the built-in ones
(``api`` imports the ``methods`` package), a user's module registers its own on import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from . import validate
from .configurable import config_defaults

FAMILIES = ("exact", "static_sparse", "dynamic_sparse", "linear", "kv_cache")
SUPPORT_FLAGS = ("causal", "non_causal", "decode", "gqa")
KINDS = ("prefill", "cache")


@dataclass(frozen=True)
class MethodInfo:
    """What a registered method is, where it comes from and what it supports."""

    name: str
    family: str
    paper: str
    arxiv: str
    year: int
    supports: tuple[str, ...]
    kinds: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "paper": self.paper,
            "arxiv": self.arxiv,
            "year": self.year,
            "supports": list(self.supports),
            "kinds": list(self.kinds),
            "config": {k: _jsonable(v) for k, v in self.config.items()},
            "summary": self.summary,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


_REGISTRY: dict[str, type] = {}
_INFO: dict[str, MethodInfo] = {}
# KV-cache policy classes. One name per idea: a cache policy may share its name with a
# prefill method (StreamingLLM is both); the name's MethodInfo then lists both kinds.
_POLICIES: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register(
    name: str,
    *,
    family: str,
    paper: str,
    arxiv: str,
    year: int,
    supports: tuple[str, ...] = ("causal", "non_causal", "gqa"),
    kinds: tuple[str, ...] = ("prefill",),
) -> Callable[[T], T]:
    """Class decorator: register a method class under ``name``.

    The class must define ``Config``, a dataclass whose fields are the method's
    hyper-parameters (all with defaults).
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}")
    for flag in supports:
        if flag not in SUPPORT_FLAGS:
            raise ValueError(f"supports flag {flag!r} is not one of {SUPPORT_FLAGS}")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {KINDS}")

    def decorate(cls: T) -> T:
        config_cls = getattr(cls, "Config", None)
        if config_cls is None or not dataclasses.is_dataclass(config_cls):
            raise TypeError(f"method {name!r}: class {cls.__name__} needs a dataclass `Config`")
        doc = (cls.__doc__ or "").strip().splitlines()
        info = MethodInfo(
            name=name,
            family=family,
            paper=paper,
            arxiv=arxiv,
            year=year,
            supports=tuple(supports),
            kinds=tuple(kinds),
            config=config_defaults(config_cls),
            summary=doc[0] if doc else "",
        )
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            old = _INFO[name]
            if set(kinds) & set(old.kinds):
                raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name]}")
            _merge(name, cls, info)
            return cls
        _REGISTRY[name] = cls
        if tuple(kinds) == ("cache",):
            _POLICIES[name] = cls
        _INFO[name] = info
        cls.name = name
        cls.info = info
        return cls

    return decorate


def _merge(name: str, cls: type, info: MethodInfo) -> None:
    """One name, two classes: a cache-only policy and a prefill method (either order).
    The prefill class stays the method class and its MethodInfo is kept, with both kinds."""
    old = _INFO[name]
    if info.kinds == ("cache",):
        _POLICIES[name] = cls
        prefill_info = old
    else:
        _REGISTRY[name] = cls
        prefill_info = info
    merged = dataclasses.replace(prefill_info, kinds=tuple(k for k in KINDS if k in set(info.kinds) | set(old.kinds)))
    _INFO[name] = merged
    for c in (_REGISTRY[name], _POLICIES[name]):
        c.name = name
        c.info = merged


def policy_class(name: str) -> type:
    """The KV-cache policy class registered under ``name``; a ValueError listing the
    cache policies otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"policy must be a str naming a KV-cache policy, got {type(name).__name__}")
    if name not in _POLICIES:
        validate.unknown_name("KV-cache policy", name, sorted(_POLICIES))
    return _POLICIES[name]




def method_class(name: str) -> type:
    """The registered class of ``name``; a ValueError listing close matches otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a str naming a registered method, got {type(name).__name__}")
    if name not in _REGISTRY:
        validate.unknown_name("method", name, sorted(_REGISTRY))
    return _REGISTRY[name]


def methods(kind: str | None = None, family: str | None = None) -> list[MethodInfo]:
    """All registered methods (optionally only one kind / family), sorted by family and name."""
    infos = list(_INFO.values())
    if kind is not None:
        infos = [i for i in infos if kind in i.kinds]
    if family is not None:
        infos = [i for i in infos if i.family == family]
    order = {f: n for n, f in enumerate(FAMILIES)}
    return sorted(infos, key=lambda i: (order[i.family], i.name))


def for_layer(name: str, config: dict[str, Any], layer: int) -> dict[str, Any]:
    """``config`` as used on layer ``layer`` of a model: a method calibrated per layer (one
    with a ``layer`` config field: sea's trained estimator, minference's plan) gets the
    layer's index unless ``config`` sets ``layer`` itself; other configs are unchanged."""
    config_cls = getattr(method_class(name), "Config", None)
    if config.get("layer") is not None or config_cls is None or not dataclasses.is_dataclass(config_cls):
        return config
    if "layer" not in {f.name for f in dataclasses.fields(config_cls)}:
        return config
    return {**config, "layer": layer}


def method_info(name: str) -> MethodInfo:
    """The MethodInfo of one registered method."""
    return method_class(name).info
