"""Shared helpers of the static sparse patterns: tile geometry and distance bands.

Positions are absolute: query i of Nq sits at Nk - Nq + i; key j at j.
"""

from __future__ import annotations

import torch

from ...kernels.pattern import cdiv


def tile_ranges(
    q_len: int, kv_len: int, block_q: int, block_k: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """First/last absolute query position of each query block, shape (nQB, 1), and
    first/last key position of each key block, shape (1, nKB)."""
    offset = kv_len - q_len
    q_lo = torch.arange(cdiv(q_len, block_q), device=device) * block_q
    q_hi = torch.clamp(q_lo + block_q - 1, max=q_len - 1)
    k_lo = torch.arange(cdiv(kv_len, block_k), device=device) * block_k
    k_hi = torch.clamp(k_lo + block_k - 1, max=kv_len - 1)
    return (q_lo + offset)[:, None], (q_hi + offset)[:, None], k_lo[None, :], k_hi[None, :]


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
