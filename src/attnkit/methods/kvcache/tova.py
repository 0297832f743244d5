"""TOVA: Token Omission Via Attention — evict what the newest query attends to least.

Paper: Oren et al., "Transformers are Multi-State RNNs", arXiv:2401.06104 (2024).
Rule: score = attention of the last query (softmax over the cache), averaged over all
heads of the layer (the paper's choice; ``per_head=True`` averages over each KV head's
query heads only); the lowest-scoring tokens are evicted, after prefill and at every
decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from .base import CachePolicy, LayerView
from .common import group_mean, window_probs


@register("tova", family="kv_cache", paper="Transformers are Multi-State RNNs (TOVA)",
          arxiv="2401.06104", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class TOVA(CachePolicy):
    """Keep the tokens the last query attends to most (layer-wise head average)."""

    default_when = "both"

    @dataclass
    class Config:
        per_head: bool = False

    def obs_window(self) -> int:
        return 1

    def score(self, view: LayerView) -> torch.Tensor:
        probs = window_probs(view, last=1)[:, :, 0]  # (B, Hq, L)
        scores = group_mean(probs, view.keys.shape[1])
        if not self.config.per_head:
            scores = scores.mean(dim=1, keepdim=True).expand_as(scores)
        return scores
