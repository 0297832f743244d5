"""Scissorhands: persistence of importance within a history window.

Paper: Liu et al., "Scissorhands: Exploiting the Persistence of Importance Hypothesis
for LLM KV Cache Compression at Test Time", arXiv:2305.17118 (2023). Rule: a token is
"important" at a step when the step's query gives it more attention than a threshold;
its score is how many of the last ``history`` queries found it important; when the cache
is over budget the tokens with the lowest counts are evicted, and the most recent
``recent_ratio * budget`` tokens are always kept.

attnkit's choices: the threshold is the uniform share ``1 / n`` of the ``n`` tokens the
query sees (``threshold`` sets a fixed value instead); GQA: the attention is averaged
over each KV head's query heads before thresholding; the prompt's contribution is the
attention of its last ``history`` queries (no N x N attention); the counts slide: step
``p`` writes slot ``p % history`` of a ring of per-token flags kept as policy state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ... import validate
from ...registry import register
from .base import CachePolicy, LayerView
from .common import group_mean, protect, recent_mask


@register("scissorhands", family="kv_cache",
          paper="Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache "
                "Compression at Test Time",
          arxiv="2305.17118", year=2023, supports=("causal", "decode", "gqa"), kinds=("cache",))
class Scissorhands(CachePolicy):
    """Evict tokens rarely important in the last `history` steps; keep the recent ones."""

    default_when = "both"

    @dataclass
    class Config:
        history: int = 32
        recent_ratio: float = 0.25
        threshold: Optional[float] = None

    def check_config(self) -> None:
        validate.check_positive(self.name, history=self.config.history)
        if not 0 <= self.config.recent_ratio <= 1:
            raise ValueError(f"scissorhands: recent_ratio must be in [0, 1], got {self.config.recent_ratio}")

    def obs_window(self) -> int:
        return self.config.history

    def accumulate(self, view: LayerView, probs: torch.Tensor, query_positions: torch.Tensor) -> None:
        attn = group_mean(probs, view.keys.shape[1])  # (B, Hkv, T, L)
        for i, p in enumerate(query_positions.tolist()):
            if self.config.threshold is not None:
                thr = torch.tensor(self.config.threshold, device=attn.device)
            else:
                seen = view.valid & (view.positions <= p)
                thr = 1.0 / seen.sum(dim=-1, keepdim=True).clamp(min=1)
            view.state[f"imp{p % self.config.history}"] = (attn[:, :, i] > thr).float()

    def score(self, view: LayerView) -> torch.Tensor:
        counts = torch.zeros(view.positions.shape, device=view.positions.device)
        for name, flags in view.state.items():
            if name.startswith("imp"):
                counts = counts + flags
        return protect(counts, recent_mask(view, int(view.budget * self.config.recent_ratio)))
