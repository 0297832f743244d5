"""StreamingLLM attention sinks + recent window (MInference's "A-shape" pattern).

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
arXiv:2309.17453 (2023). Rule (query i, key j): j < S or i - W < j, with j <= i when
causal. Deviation: the paper is causal only; non-causal uses the symmetric window
(j < S or |i - j| < W), the natural extension used by Longformer-style global tokens.
The same idea as a KV-cache policy lives in ``methods/kvcache/``.
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
    "streaming",
    family="static_sparse",
    paper="Efficient Streaming Language Models with Attention Sinks",
    arxiv="2309.17453",
    year=2023,
)
class Streaming(PatternMethod):
    """The first S keys (attention sinks) plus a window of the W most recent keys."""

    @dataclass
    class Config:
        sink: int = 4
        window: int = 1024

    def check_config(self) -> None:
        validate.check_positive(self.name, sink=self.config.sink, window=self.config.window)

    def mask_mod(self, causal: bool, kv_len: Optional[int] = None, device: Optional[torch.device] = None):
        lo, hi = window_band(self.config.window, causal)
        sink = self.config.sink

        def streaming(b, h, q_pos, k_pos):
            dist = q_pos - k_pos
            allowed = (k_pos < sink) | ((dist >= lo) & (dist <= hi))
            return allowed & (dist >= 0) if causal else allowed

        return streaming

    def block_mask(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> torch.Tensor:
        lo, hi = window_band(self.config.window, causal)
        q_lo, q_hi, k_lo, k_hi = tile_ranges(q_len, kv_len, self.block_q, self.block_k, device)
        sinks = k_lo < self.config.sink
        if causal:
            sinks = sinks & (k_lo <= q_hi)
        return band_tiles(q_lo, q_hi, k_lo, k_hi, lo, hi) | sinks

    def full_block_mask(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> torch.Tensor:
        lo, hi = window_band(self.config.window, causal)
        q_lo, q_hi, k_lo, k_hi = tile_ranges(q_len, kv_len, self.block_q, self.block_k, device)
        sinks = k_hi < self.config.sink
        if causal:
            sinks = sinks & (k_hi <= q_lo)
        return band_full_tiles(q_lo, q_hi, k_lo, k_hi, lo, hi) | sinks
