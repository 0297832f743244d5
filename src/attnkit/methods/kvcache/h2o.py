"""H2O: Heavy-Hitter Oracle — accumulated attention plus the most recent tokens.

Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
Large Language Models", arXiv:2306.14048 (2023). Rule: every token's score is the
attention it has received, summed over the queries so far; the cache keeps the
``recent_ratio * budget`` most recent tokens and fills the rest with the highest scores,
evicting at every decode step. Deviation (so that prefill never builds the N x N
attention): the prompt's contribution is the attention of its last ``window`` queries;
decode steps add their full attention rows. GQA: mean over each KV head's query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import validate
from ...registry import register
from .base import CachePolicy, LayerView
from .common import group_mean, protect, recent_mask


@register("h2o", family="kv_cache",
          paper="H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
          arxiv="2306.14048", year=2023, supports=("causal", "decode", "gqa"), kinds=("cache",))
class H2O(CachePolicy):
    """Accumulated attention (heavy hitters) plus a recent window."""

    default_when = "both"

    @dataclass
    class Config:
        recent_ratio: float = 0.5
        window: int = 32

    def check_config(self) -> None:
        validate.check_positive(self.name, window=self.config.window)
        if not 0 <= self.config.recent_ratio <= 1:
            raise ValueError(f"h2o: recent_ratio must be in [0, 1], got {self.config.recent_ratio}")

    def obs_window(self) -> int:
        return self.config.window

    def accumulate(self, view: LayerView, probs: torch.Tensor, query_positions: torch.Tensor) -> None:
        gained = group_mean(probs.sum(dim=2), view.keys.shape[1])
        view.state["acc"] = view.state.get("acc", torch.zeros_like(gained)) + gained

    def score(self, view: LayerView) -> torch.Tensor:
        acc = view.state.get("acc", torch.zeros(view.positions.shape, device=view.positions.device))
        return protect(acc, recent_mask(view, int(view.budget * self.config.recent_ratio)))
