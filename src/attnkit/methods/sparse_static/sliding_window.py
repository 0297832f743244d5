"""Sliding-window (local) attention.

Papers: Beltagy et al., "Longformer: The Long-Document Transformer", arXiv:2004.05150
(2020) — the local window; Child et al. (2019) use the same band. Rule (query i, key j):
causal: i - W < j <= i; non-causal: |i - j| < W.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ... import validate
from ...kernels.pattern import tile_ranges
from ...registry import register
from ..base import PatternMethod
from .common import band_full_tiles, band_tiles, window_band


@register(
    "sliding_window",
    family="static_sparse",
    paper="Longformer: The Long-Document Transformer",
    arxiv="2004.05150",
    year=2020,
)
class SlidingWindow(PatternMethod):
    """Each query attends to the W nearest keys (the W most recent when causal)."""

    @dataclass
    class Config:
        window: int = 1024

    def check_config(self) -> None:
        validate.check_positive(self.name, window=self.config.window)

    def mask_mod(self, causal: bool, kv_len: Optional[int] = None, device: Optional[torch.device] = None):
        lo, hi = window_band(self.config.window, causal)

        def sliding(b, h, q_pos, k_pos):
            dist = q_pos - k_pos
            return (dist >= lo) & (dist <= hi)

        return sliding

    def block_mask(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> torch.Tensor:
        lo, hi = window_band(self.config.window, causal)
        return band_tiles(*tile_ranges(q_len, kv_len, self.block_q, self.block_k, device), lo, hi)

    def full_block_mask(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> torch.Tensor:
        lo, hi = window_band(self.config.window, causal)
        return band_full_tiles(*tile_ranges(q_len, kv_len, self.block_q, self.block_k, device), lo, hi)
