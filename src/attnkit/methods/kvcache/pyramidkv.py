"""PyramidKV: layer budgets that shrink with depth, SnapKV selection within a layer.

Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv:2406.02069 (2024). Rule (the authors' code): with B the
average budget, W the window and L layers, the non-window budget of layer l falls
linearly from ``2(B-W) - (B-W)/beta`` at layer 0 to ``(B-W)/beta`` at the last layer, so
the layers average B; each layer selects as SnapKV does.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...registry import register
from .snapkv import POOLINGS, SnapKV


def pyramid_budget(budget: int, window: int, beta: float, layer_idx: int, num_layers: int) -> int:
    """Tokens per head of layer ``layer_idx`` (window included)."""
    if budget <= window or num_layers <= 1:
        return budget
    low = (budget - window) / beta
    high = 2 * (budget - window) - low
    step = (high - low) / (num_layers - 1)
    return max(1, int(high - layer_idx * step) + window)


@register("pyramidkv", family="kv_cache",
          paper="PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
          arxiv="2406.02069", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class PyramidKV(SnapKV):
    """SnapKV with budgets decreasing linearly with layer depth (same total)."""

    @dataclass
    class Config:
        window: int = 32
        kernel: int = 7
        pooling: str = "avg"
        beta: float = 20.0

    def check_config(self) -> None:
        super().check_config()
        if not self.config.beta >= 1:
            raise ValueError(f"pyramidkv: beta must be >= 1, got {self.config.beta}")
        if self.config.pooling not in POOLINGS:
            raise ValueError(f"pyramidkv: pooling must be one of {POOLINGS}")

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int) -> int:
        return pyramid_budget(budget, self.config.window, self.config.beta, layer_idx, num_layers)
