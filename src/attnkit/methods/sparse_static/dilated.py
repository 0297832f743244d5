"""Dilated sliding-window attention.

Papers: Beltagy et al., "Longformer", arXiv:2004.05150 (dilated window); Ding et al.,
"LongNet: Scaling Transformers to 1,000,000,000 Tokens", arXiv:2307.02486 (2023)
(dilation). Rule (query i, key j): (i - j) % r == 0 and |i - j| < W * r, with j <= i
when causal: W keys of the query's residue class, spaced r apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ... import validate
from ...kernels.pattern import tile_ranges
from ...registry import register
from ..base import PatternMethod
from .common import band_tiles, window_band


@register(
    "dilated",
    family="static_sparse",
    paper="Longformer: The Long-Document Transformer",
    arxiv="2004.05150",
    year=2020,
)
class Dilated(PatternMethod):
    """A window of W keys spaced ``dilation`` apart (same residue class as the query)."""

    @dataclass
    class Config:
        window: int = 256
        dilation: int = 2

    def check_config(self) -> None:
        validate.check_positive(self.name, window=self.config.window, dilation=self.config.dilation)

    def _band(self, causal: bool) -> tuple[int, int]:
        return window_band(self.config.window * self.config.dilation, causal)

    def mask_mod(self, causal: bool, kv_len: Optional[int] = None, device: Optional[torch.device] = None):
        lo, hi = self._band(causal)
        r = self.config.dilation

        def dilated(b, h, q_pos, k_pos):
            dist = q_pos - k_pos
            return (dist >= lo) & (dist <= hi) & (dist % r == 0)

        return dilated

    def block_mask(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> torch.Tensor:
        lo, hi = self._band(causal)
        return band_tiles(*tile_ranges(q_len, kv_len, self.block_q, self.block_k, device), lo, hi)
