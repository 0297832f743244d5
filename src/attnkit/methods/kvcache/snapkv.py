"""SnapKV: the observation window of the last prompt queries votes for the keys to keep.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv:2404.14469 (2024). Rule: the last ``window`` queries attend (softmax over every key
they see); each key's vote is the attention averaged over the window queries, smoothed by
1D pooling over positions (``kernel``, stride 1, same length); each KV head keeps its top
``budget - window`` voted keys plus the window itself. GQA: votes are averaged over the
query heads of each KV head (kvpress; FasterDecoding/SnapKV issue 22).
Defaults are the paper's (window 32, kernel 7, max pooling); ``pooling="avg", window=64,
kernel=5`` is kvpress's ``SnapKVPress`` and selects the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import validate
from ...registry import register
from .base import CachePolicy, LayerView
from .common import group_mean, pool1d, protect, window_probs, window_slots

POOLINGS = ("max", "avg", "none")


def snapkv_votes(view: LayerView, kernel: int, pooling: str) -> torch.Tensor:
    """(B, Hkv, L) pooled window votes of the slots before the window (0 on the window)."""
    probs = window_probs(view)  # (B, Hq, W, L)
    in_window = window_slots(view)
    g = probs.shape[1] // view.keys.shape[1]
    in_window_q = in_window.repeat_interleave(g, dim=1) if g > 1 else in_window
    probs = probs.masked_fill(in_window_q[:, :, None, :], 0.0)
    votes = pool1d(probs.mean(dim=-2), kernel, pooling)
    return group_mean(votes, view.keys.shape[1])


@register("snapkv", family="kv_cache", paper="SnapKV: LLM Knows What You are Looking for Before Generation",
          arxiv="2404.14469", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class SnapKV(CachePolicy):
    """Observation-window attention votes, pooled; top-k per head plus the window."""

    @dataclass
    class Config:
        window: int = 32
        kernel: int = 7
        pooling: str = "max"

    def always_kept(self) -> tuple[int, str]:
        return self.config.window, f"observation window, window={self.config.window}"

    def check_config(self) -> None:
        validate.check_positive(self.name, window=self.config.window, kernel=self.config.kernel)
        if self.config.pooling not in POOLINGS:
            raise ValueError(f"snapkv: pooling must be one of {POOLINGS}, got {self.config.pooling!r}")

    def obs_window(self) -> int:
        return self.config.window

    def score(self, view: LayerView) -> torch.Tensor:
        votes = snapkv_votes(view, self.config.kernel, self.config.pooling)
        return protect(votes, window_slots(view))
