"""attnkit: efficient attention for long-context transformers.

>>> import torch, attnkit as ak
>>> q = torch.randn(1, 8, 4096, 64); k = v = torch.randn(1, 2, 4096, 64)
>>> out = ak.attention(q, k, v, method="streaming", causal=True, sink=64, window=1024)
"""

from __future__ import annotations

from .api import attention, get
from .methods.base import AttentionStats, Method
from .reference import reference_attention
from .registry import MethodInfo, method_info, methods, register

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "Method",
    "MethodInfo",
    "attention",
    "get",
    "method_info",
    "methods",
    "reference_attention",
    "register",
]


def __getattr__(name: str):
    # Heavy, optional parts load on first use: the transformers integration and models.
    if name == "KVCache":
        from .kvcache import KVCache

        return KVCache
    if name in ("patch", "apply", "unpatch"):
        from . import patching

        return getattr(patching, name)
    if name in ("plan", "Plan"):
        from . import head_plan

        return getattr(head_plan, name)
    if name in ("models", "bench", "analysis"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")
