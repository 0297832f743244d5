"""Knorm: keep the keys with the lowest L2 norm.

Paper: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", arXiv:2406.11430 (2024). Rule: score = -||k||_2 per KV head; no queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from .base import CachePolicy, LayerView


@register("knorm", family="kv_cache",
          paper="A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
          arxiv="2406.11430", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class Knorm(CachePolicy):
    """Keep the keys with the smallest L2 norm."""

    @dataclass
    class Config:
        pass

    def score(self, view: LayerView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)
