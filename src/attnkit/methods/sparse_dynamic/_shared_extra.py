"""Helpers shared by dynamic methods beyond ``common.py``: per-token tables in element
rules, and methods that run block-sparse attention on *permuted* tokens.

Permuted methods (``routing``, ``pbs``, ``biformer``) reorder queries and/or keys so that
the pairs they want fall into few blocks, run the ordinary block kernel in the permuted
order and scatter the output back. Their element rule needs the original positions
(causality), which it reads from per-token tables with ``lookup``.

``PermutedMethod`` owns that flow: a subclass implements ``estimate_permuted`` and gets
the timed estimator, the permuted kernel run and stats whose ``pattern`` is an
equivalent pattern in the *original* token order (exact ``dense_mask()``, so attention
mass recall can be computed against q, k as given).

Positions are absolute: query i of Nq sits at Nk - Nq + i (bottom-right aligned).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from ...kernels import BlockPattern, lists_from_block_mask, run_pattern
from ...kernels.pattern import block_mask_from_lists
from ..base import AttentionStats, full_pairs
from .common import DynamicMethod


def lookup(table: torch.Tensor, b: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, group: int = 1) -> torch.Tensor:
    """``table[b, h // group, idx]`` with broadcast index tensors (a mask_mod building block).

    table: (Bt, Ht, N) with Bt in {1, B}, Ht in {1, H // group}; idx is clamped to [0, N)
    because kernels evaluate rules on padded rows/keys too (they mask those themselves).
    """
    bt, ht, n = table.shape[:3]
    return table[b % bt, (h // group) % ht, idx.clamp(0, n - 1)]


def lookup_2d(table: torch.Tensor, b: torch.Tensor, h: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``table[b, h, row, col]`` with broadcast, clamped indices. table: (Bt, Ht, R, C),
    Bt in {1, B}, Ht in {1, Hq} (a per-token / per-block lookup inside a mask_mod)."""
    bt, ht, r, c = table.shape
    return table[b % bt, h % ht, row.clamp(0, r - 1), col.clamp(0, c - 1)]


def gather_tokens(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """x: (B, H, N, D), perm: (Bp, Hp, N) original index of each permuted slot -> (B, H, N, D)."""
    if perm is None:
        return x
    b, h, n, d = x.shape
    idx = perm.expand(b, h, n).unsqueeze(-1).expand(b, h, n, d)
    return torch.gather(x, 2, idx)


def scatter_tokens(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``gather_tokens``: slot i of x goes back to original index perm[..., i]."""
    if perm is None:
        return x
    b, h, n, d = x.shape
    idx = perm.expand(b, h, n).unsqueeze(-1).expand(b, h, n, d)
    return torch.empty_like(x).scatter_(2, idx, x)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """(…, N) permutation -> (…, N) inverse: inv[perm[i]] = i."""
    ar = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, ar)


@dataclass
class Permutation:
    """Token orders of a permuted pattern: slot i holds original token ``perm[..., i]``.

    q: (Bp, Hq|1, Nq) or None (queries not permuted); k: (Bp, Hkv|1, Nk) or None.
    """

    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None


def original_order_pattern(pattern: BlockPattern, perm: Permutation, group: int) -> BlockPattern:
    """The pattern of ``pattern`` (which lives in permuted order) in the original token order.

    Lists every tile and decides each pair through the inverse permutations, so it is
    exact but as slow as dense attention to *run*: it is for stats, tests and recall.
    """
    nqb, nkb = pattern.num_q_blocks, pattern.num_kv_blocks
    listed = block_mask_from_lists(pattern.kv_blocks, nkb)  # (Bp, Hp, nQB, nKB), permuted order
    inv_q = None if perm.q is None else inverse_permutation(perm.q)
    inv_k = None if perm.k is None else inverse_permutation(perm.k)
    off, bq, bk, rule = pattern.q_offset, pattern.block_q, pattern.block_k, pattern.mask_mod

    def in_original_order(b, h, q_pos, k_pos):
        qs = q_pos if inv_q is None else lookup(inv_q, b, h, q_pos - off) + off
        ks = k_pos if inv_k is None else lookup(inv_k, b, h, k_pos, group)
        lb, lh = listed.shape[:2]
        ok = listed[b % lb, h % lh, ((qs - off) // bq).clamp(0, nqb - 1), (ks // bk).clamp(0, nkb - 1)]
        if rule is not None:
            ok = ok & rule(b, h, qs, ks)
        return ok

    all_tiles = torch.arange(nkb, device=listed.device).expand(1, 1, nqb, nkb).contiguous()
    return BlockPattern(
        kv_blocks=all_tiles, block_q=bq, block_k=bk, q_len=pattern.q_len, kv_len=pattern.kv_len, mask_mod=in_original_order
    )


def pattern_from_mask(mask: torch.Tensor, block_q: int, block_k: int, q_len: int, kv_len: int, mask_mod=None, full=None) -> BlockPattern:
    """BlockPattern from a (Bp, Hp, nQB, nKB) bool tile mask without any causal trimming
    (permuted orders have no positional block causality); ``full``: optional tile mask of
    tiles whose every pair is allowed."""
    lists = lists_from_block_mask(mask)
    full_tiles = None
    if full is not None:
        full_tiles = full.expand_as(mask).gather(-1, lists.clamp(min=0)) & (lists >= 0)
    return BlockPattern(kv_blocks=lists, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len, mask_mod=mask_mod, full_tiles=full_tiles)


class PermutedMethod(DynamicMethod):
    """A dynamic method whose pattern lives in a permuted token order.

    Subclasses implement ``estimate_permuted(q, k, causal, scale) -> (pattern, Permutation)``;
    the pattern's element rule receives *permuted* positions (use ``lookup`` on original
    position tables). ``stats.pattern`` is the equivalent pattern in the original order.
    """

    def estimate_permuted(self, q, k, causal: bool, scale: float) -> tuple[BlockPattern, Permutation]:
        raise NotImplementedError

    def forward(self, q, k, v, causal, scale, backend, want_stats):
        start = time.perf_counter()
        with torch.no_grad():
            pattern, perm = self.estimate_permuted(q, k, causal, scale)
        estimator_seconds = time.perf_counter() - start
        qp, kp, vp = gather_tokens(q, perm.q), gather_tokens(k, perm.k), gather_tokens(v, perm.k)
        out, _, used = run_pattern(qp, kp, vp, pattern, scale, backend, count_pairs=False, method=self.name)
        out = scatter_tokens(out, perm.q)
        density, stats_pattern = float("nan"), pattern
        if want_stats:
            b, hq, nq = q.shape[:3]
            density = self.count_pairs(pattern, b, hq) / (full_pairs(nq, k.shape[2], causal) * b * hq)
            stats_pattern = original_order_pattern(pattern, perm, hq // k.shape[1])
        return out, AttentionStats(self.name, density, stats_pattern, estimator_seconds, used)
