"""KeyDiff: keep the keys least similar to the average key.

Paper: Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context
LLM Inference in Resource-Constrained Environments", arXiv:2504.15364 (2025). Rule: the
anchor is the mean of the L2-normalised keys of a head; score = -cos(k, anchor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...registry import register
from .base import CachePolicy, LayerView


@register("keydiff", family="kv_cache", paper="KeyDiff: Key Similarity-Based KV Cache Eviction",
          arxiv="2504.15364", year=2025, supports=("causal", "decode", "gqa"), kinds=("cache",))
class KeyDiff(CachePolicy):
    """Keep the keys most different (lowest cosine) from the head's mean key."""

    @dataclass
    class Config:
        pass

    def score(self, view: LayerView) -> torch.Tensor:
        keys = F.normalize(view.keys.float(), dim=-1)
        valid = view.valid[..., None].float()
        anchor = (keys * valid).sum(dim=2, keepdim=True) / valid.sum(dim=2, keepdim=True).clamp(min=1)
        return -F.cosine_similarity(keys, anchor, dim=-1)
