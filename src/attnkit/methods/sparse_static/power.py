"""PowerAttention: a local window, sinks, and keys at power-of-two distances.

Paper: Chen et al., "PowerAttention: Exponentially Scaling of Receptive Fields for
Effective Sparse Attention", arXiv:2503.03588 (2025). Section 3.3: each token attends
only to positions whose index difference is a power of two, so over l layers a token
reaches every token within distance 2^l (any distance is a sum of powers of two), while
attending to O(log N) positions; in practice this is combined with a sliding window and
attention sinks, and the paper's FlexAttention kernel applies the rule to blocks.

Rule, with positions grouped into blocks of ``block`` tokens (qb = i // block,
kb = j // block, D = qb - kb; ``block=1`` is the token-level rule i - j = 2^k):

    causal:      j <= i  and  (D < window_blocks  or  kb < sink_blocks  or  D = 2^k, k >= 0)
    non-causal:  |D| < window_blocks  or  kb < sink_blocks  or  |D| = 2^k, k >= 0

Defaults (block=256, window_blocks=5, sink_blocks=1) are the block-level configuration
reported for the paper's kernel (5 local blocks + 1 sink block + power-of-two blocks,
about 10 key blocks per query block at 32K); set ``block=1`` with a token window for the
token-level pattern of Section 3.3. Deviation: the paper is causal only; the non-causal
variant mirrors the rule (|D| a power of two, a symmetric window) and keeps key sinks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ... import validate
from ...kernels.pattern import tile_ranges
from ...registry import register
from ..base import PatternMethod


@register(
    "power",
    family="static_sparse",
    paper="PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse Attention",
    arxiv="2503.03588",
    year=2025,
)
class Power(PatternMethod):
    """Keys at power-of-two (block) distances plus a local window and sinks (PowerAttention)."""

    @dataclass
    class Config:
        block: int = 256
        window_blocks: int = 5
        sink_blocks: int = 1

    def check_config(self) -> None:
        validate.check_positive(self.name, block=self.config.block, window_blocks=self.config.window_blocks)
        validate.check_non_negative(self.name, sink_blocks=self.config.sink_blocks)

    def mask_mod(self, causal: bool, kv_len: Optional[int] = None, device: Optional[torch.device] = None):
        g, window, sink = self.config.block, self.config.window_blocks, self.config.sink_blocks

        def power(b, h, q_pos, k_pos):
            kb = k_pos // g
            dist = q_pos // g - kb
            if not causal:
                dist = dist.abs()
            allowed = (dist < window) | (kb < sink) | ((dist > 0) & ((dist & (dist - 1)) == 0))
            return allowed & (k_pos <= q_pos) if causal else allowed

        return power

    def block_mask(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> torch.Tensor:
        """Tiles whose range of block distances meets the window, a power of two or a sink."""
        g, window, sink = self.config.block, self.config.window_blocks, self.config.sink_blocks
        q_lo, q_hi, k_lo, k_hi = tile_ranges(q_len, kv_len, self.block_q, self.block_k, device)
        # Every block distance in [d_lo, d_hi] occurs in the tile (difference of two ranges).
        d_lo, d_hi = q_lo // g - k_hi // g, q_hi // g - k_lo // g
        if causal:
            reach = k_lo <= q_hi
            a_lo, a_hi = d_lo.clamp(min=0), d_hi
        else:
            reach = torch.ones_like(k_lo <= q_hi)
            straddle = (d_lo <= 0) & (d_hi >= 0)
            a_lo = torch.where(straddle, torch.zeros_like(d_lo), torch.minimum(d_lo.abs(), d_hi.abs()))
            a_hi = torch.maximum(d_lo.abs(), d_hi.abs())
        hit = (a_lo < window) | (k_lo // g < sink)
        span = int(a_hi.max().item()) if a_hi.numel() else 0
        p = 1
        while p <= span:
            hit = hit | ((a_lo <= p) & (a_hi >= p))
            p *= 2
        return hit & reach & (a_hi >= a_lo)
