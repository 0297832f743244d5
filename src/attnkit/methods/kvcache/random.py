"""Random eviction: the baseline every policy must beat.

No paper of its own (kvpress's RandomPress; the baseline of e.g. H2O, arXiv:2306.14048).
Rule: uniform random scores from a generator seeded with ``seed + layer_idx``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from .base import CachePolicy, LayerView


@register("random", family="kv_cache", paper="baseline: uniform random eviction (kvpress RandomPress; the baseline H2O compares against)",
          arxiv="2306.14048", year=2023, supports=("causal", "decode", "gqa"), kinds=("cache",))
class RandomPolicy(CachePolicy):
    """Keep a uniformly random subset of tokens (seeded)."""

    @dataclass
    class Config:
        seed: int = 0

    def score(self, view: LayerView) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.config.seed + view.layer_idx)
        return torch.rand(view.positions.shape, generator=gen).to(view.positions.device)
