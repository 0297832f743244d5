"""How attnkit's attention finds the ``attnkit.KVCache`` layer behind a key tensor.

A cache layer's ``update`` returns its keys tagged with the layer (``tag_keys``); the
attention function, which receives only tensors from the model, gets the layer back with
``cache_layer_of``. Kept apart from ``kvcache.py`` so that ``patching.py`` needs neither
``transformers``' cache classes nor an import of the cache.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

CACHE_LAYER_ATTR = "_attnkit_cache_layer"  # the attribute set on a cache layer's key tensor


def tag_keys(keys: torch.Tensor, layer: Any) -> torch.Tensor:
    """Mark ``keys`` (B, Hkv, L, D), returned by ``layer.update``, as held by ``layer``; returns keys."""
    setattr(keys, CACHE_LAYER_ATTR, layer)
    return keys


def cache_layer_of(keys: torch.Tensor) -> Optional[Any]:
    """The cache layer that returned ``keys`` (a ``KVCacheLayer``), or None for plain keys."""
    return getattr(keys, CACHE_LAYER_ATTR, None)
