"""Shared helpers of the static sparse patterns: distance bands over tiles (whose bounds
``kernels.pattern.tile_ranges`` gives).

Positions are absolute: query i of Nq sits at Nk - Nq + i; key j at j.
"""

from __future__ import annotations

import torch


def band_tiles(
    q_lo: torch.Tensor, q_hi: torch.Tensor, k_lo: torch.Tensor, k_hi: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """(nQB, nKB) bool: tiles holding a pair whose distance i - j lies in [lo, hi]."""
    return (q_lo - k_hi <= hi) & (q_hi - k_lo >= lo)


def window_band(window: int, causal: bool) -> tuple[int, int]:
    """Distances i - j of a window of ``window`` keys: [0, W-1] causal, [-(W-1), W-1] otherwise."""
    return (0 if causal else -(window - 1)), window - 1


def band_full_tiles(
    q_lo: torch.Tensor, q_hi: torch.Tensor, k_lo: torch.Tensor, k_hi: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """(nQB, nKB) bool: tiles whose every pair has distance i - j in [lo, hi]."""
    return (q_lo - k_hi >= lo) & (q_hi - k_lo <= hi)
