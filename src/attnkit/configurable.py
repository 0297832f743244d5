"""Config handling shared by attention methods and KV-cache policies.

A configurable class declares ``Config``, a dataclass whose fields are its
hyper-parameters (all with defaults), and may override ``check_config`` to reject
out-of-range values. ``@register`` sets ``name`` and ``info``. Building one:

    Policy(window=8)             # keyword fields -> Config(window=8), type-checked
    Policy(Policy.Config(8))     # or a ready Config object

An unknown field is a ValueError that lists every valid field with its default.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from . import validate


def config_defaults(config_cls: type) -> dict[str, Any]:
    """Field name -> default value of a config dataclass (None for a field without one)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = None
    return out


def build_config(config_cls: type, method: str, kwargs: dict[str, Any], inputs: tuple[str, ...] = ()) -> Any:
    """Make ``config_cls(**kwargs)``; unknown fields and wrong types raise with the valid
    fields (and the method's per-call ``inputs``, for a method that declares some)."""
    defaults = config_defaults(config_cls)
    unknown = [key for key in kwargs if key not in defaults]
    if unknown:
        listing = ", ".join(f"{n}={v!r}" for n, v in defaults.items()) or "(none)"
        extra = f"; per-call inputs: {', '.join(inputs)}" if inputs else ""
        raise ValueError(
            f"unknown config field(s) {', '.join(map(repr, unknown))} for method {method!r}; "
            f"valid fields with defaults: {listing}{extra}"
        )
    hints = typing.get_type_hints(config_cls)
    for key, value in kwargs.items():
        validate.check_type(method, key, value, hints.get(key, Any))
    return config_cls(**kwargs)


class Configurable:
    """Holds one config: ``self.config``, an instance of the class's ``Config``."""

    Config: ClassVar[type]
    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()  # per-call tensors (linear family: g, beta, initial_state)

    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise ValueError("pass either a config object or keyword fields, not both")
        self.config = config if config is not None else build_config(self.Config, self.name, kwargs, self.inputs)
        self.check_config()

    def check_config(self) -> None:
        """Raise ValueError for out-of-range hyper-parameters (override). Must not change
        ``self``'s declared contract (class attributes): derive it in methods instead."""
