"""A2SF: accumulated attention with a forgetting factor.

Paper: Jo and Shin, "A2SF: Accumulative Attention Scoring with Forgetting Factor for
Token Pruning in Transformer Decoder", arXiv:2407.20485 (2024). Rule: H2O's accumulated
score, but older contributions decay: ``acc <- forget * acc + attention of the new
query`` at every query; keep ``recent_ratio * budget`` recent tokens and the top scores.
Prompt: the last ``window`` queries, folded in order (as H2O here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from .base import LayerView
from .common import group_mean
from .h2o import H2O


@register("a2sf", family="kv_cache",
          paper="A2SF: Accumulative Attention Scoring with Forgetting Factor for Token Pruning in Transformer Decoder",
          arxiv="2407.20485", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class A2SF(H2O):
    """H2O with a forgetting factor on the accumulated attention."""

    @dataclass
    class Config:
        forget: float = 0.9
        recent_ratio: float = 0.5
        window: int = 32

    def check_config(self) -> None:
        super().check_config()
        if not 0 < self.config.forget <= 1:
            raise ValueError(f"a2sf: forget must be in (0, 1], got {self.config.forget}")

    def accumulate(self, view: LayerView, probs: torch.Tensor, query_positions: torch.Tensor) -> None:
        per_query = group_mean(probs, view.keys.shape[1])  # (B, Hkv, T, L)
        acc = view.state.get("acc", torch.zeros_like(per_query[:, :, 0]))
        for i in range(per_query.shape[2]):
            acc = self.config.forget * acc + per_query[:, :, i]
        view.state["acc"] = acc
