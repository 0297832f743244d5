"""How attnkit's attention finds the ``attnkit.KVCache`` layer behind a key tensor.

A cache layer's ``update`` returns its keys tagged with the layer (``tag_keys``); the
attention function, which receives only tensors from the model, gets the layer back with
``cache_layer_of``. Kept apart from ``kvcache.py`` so that ``patching.py`` needs neither
``transformers``' cache classes nor an import of the cache.
"""

from __future__ import annotations

import contextvars
import weakref
from typing import Any, Optional

import torch

CACHE_LAYER_ATTR = "_attnkit_cache_layer"  # the attribute set on a cache layer's key tensor
# the cache layer whose ``update`` returned last: MLA layers (Kimi-Linear) cache latents and
# expand them into keys after the cache, so their keys reach attention untagged (a weak
# reference: a finished generate's cache must not be kept alive by it)
_LAST: contextvars.ContextVar[Optional[weakref.ref]] = contextvars.ContextVar("attnkit_last_cache_layer", default=None)


def tag_keys(keys: torch.Tensor, layer: Any) -> torch.Tensor:
    """Mark ``keys`` (B, Hkv, L, D), returned by ``layer.update``, as held by ``layer``; returns keys."""
    setattr(keys, CACHE_LAYER_ATTR, layer)
    _LAST.set(weakref.ref(layer))
    return keys


def latent_layer_of(module: Any, keys: torch.Tensor) -> Optional[Any]:
    """The cache layer that holds the latents ``keys`` (B, H, L, D) were expanded from: the
    layer updated last, for this module's layer index, still awaiting its attention, with
    L slots. None otherwise."""
    ref = _LAST.get()
    layer = ref() if ref is not None else None
    if layer is None or not getattr(layer, "_awaiting_attention", False):
        return None
    if layer.layer_idx != getattr(module, "layer_idx", None) or layer.positions.shape[2] != keys.shape[2]:
        return None
    return layer


def cache_layer_of(keys: torch.Tensor) -> Optional[Any]:
    """The cache layer that returned ``keys`` (a ``KVCacheLayer``), or None for plain keys."""
    return getattr(keys, CACHE_LAYER_ATTR, None)
