"""A static pattern intersected with a sliding window: a user's method on a model layer
that has its own sliding window (Mistral, Gemma 2/3, ModernBERT's local layers).

Not a paper's method and not registered: ``attnkit.patching`` builds it when a planned
layer has a window (the model's pattern and the method's pattern both hold; rule:
``inner(i, j) and window(i, j)``). It runs on the same kernels as any PatternMethod.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..base import PatternMethod
from ...kernels.pattern import tile_ranges
from .common import band_full_tiles, band_tiles, window_band
from .sliding_window import SlidingWindow


class WithinWindow(PatternMethod):
    """``inner``'s pattern restricted to ``window``'s keys (both PatternMethods)."""

    @dataclass
    class Config:
        window: int = 1024

    def __init__(self, inner: PatternMethod, window: SlidingWindow) -> None:
        self.inner, self.window = inner, window
        self.name = f"{inner.name}+window"
        self.info = inner.info
        super().__init__(window=window.config.window)

    def __repr__(self) -> str:
        return f"WithinWindow({self.inner!r}, window={self.config.window})"

    def block_size(self) -> tuple[int, int]:
        return self.inner.block_size()

    def mask_mod(self, causal: bool, kv_len: Optional[int] = None, device: Optional[torch.device] = None):
        inner, window = self.inner.mask_mod(causal, kv_len, device), self.window.mask_mod(causal, kv_len, device)

        def within_window(b, h, q_pos, k_pos):
            return inner(b, h, q_pos, k_pos) & window(b, h, q_pos, k_pos)

        return within_window

    def _window_tiles(self, q_len: int, kv_len: int, causal: bool, device: torch.device, full: bool) -> torch.Tensor:
        lo, hi = window_band(self.config.window, causal)
        ranges = tile_ranges(q_len, kv_len, *self.block_size(), device)
        return band_full_tiles(*ranges, lo, hi) if full else band_tiles(*ranges, lo, hi)

    def block_mask(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> torch.Tensor:
        inner = self.inner.block_mask(q_len, kv_len, causal, device)
        return inner & self._window_tiles(q_len, kv_len, causal, device, full=False)

    def full_block_mask(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> Optional[torch.Tensor]:
        inner = self.inner.full_block_mask(q_len, kv_len, causal, device)
        if inner is None:
            return None
        return inner & self._window_tiles(q_len, kv_len, causal, device, full=True)
