"""Files of per-layer calibrated tensors (SEA's trained estimator, Hedgehog's distilled
feature maps): one torch file ``{"method", "version", "layers": {i: {name: tensor}},
"meta"}``, written by ``save_layers`` and read (validated, cached per path and
modification time) by ``load_layers``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

_LOADED: dict[str, tuple[float, dict]] = {}


def save_layers(path: str, method: str, version: int, layers: dict[int, dict[str, torch.Tensor]],
                names: Iterable[str], **meta: Any) -> None:
    """Write ``layers`` ({layer: {name: tensor}}, only ``names`` kept, float32 on the CPU)."""
    names = tuple(names)
    clean = {int(i): {n: entry[n].float().cpu() for n in names} for i, entry in layers.items()}
    torch.save({"method": method, "version": version, "layers": clean, "meta": meta}, path)
    _LOADED.pop(os.path.abspath(path), None)


def load_layers(path: str, method: str, version: int, *, noun: str, missing_hint: str, what: str,
                check_entry: Callable[[dict, str], None]) -> dict:
    """Read a file written by ``save_layers`` for ``method`` at ``version``.

    ``noun`` names the file in errors ("estimator file"), ``missing_hint`` says how to make
    one, ``what`` what it should be ("a SEA estimator (written by save_estimator)");
    ``check_entry(entry, where)`` raises on a malformed layer entry."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ValueError(f"{noun} {path!r} does not exist: {missing_hint}")
    mtime = os.path.getmtime(full)
    if full in _LOADED and _LOADED[full][0] == mtime:
        return _LOADED[full][1]
    try:
        data = torch.load(full, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file
        raise ValueError(f"{noun} {path!r} could not be read as a torch file: {exc}") from exc
    if not isinstance(data, dict) or data.get("method") != method or not isinstance(data.get("layers"), dict):
        raise ValueError(f"{noun} {path!r} is not {what}")
    if data.get("version") != version:
        raise ValueError(f"{noun} {path!r} has version {data.get('version')!r}; this attnkit reads version {version}")
    for i, entry in data["layers"].items():
        check_entry(entry, f"{noun} {path!r} layer {i}")
    _LOADED[full] = (mtime, data)
    return data
