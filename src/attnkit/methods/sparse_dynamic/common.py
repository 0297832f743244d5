"""Shared machinery of the dynamic (content-aware) sparse methods.

A dynamic method is an *estimator* (q, k -> a pattern) plus a kernel. Subclass
``DynamicMethod``, implement ``estimate`` and you get: input checks (from ``Method``),
the estimator timed into ``AttentionStats.estimator_seconds`` (run without gradients:
the selection is a discrete choice), the kernel chosen and run by the kernel layer
(``kernels.run``: every backend that can run the pattern, exact gradients, the
log-sum-exp), and ``density`` counted without an N x N tensor when stats are wanted.

``MixedPatternMethod`` is the base of methods that pick a pattern kind per head
(``kernels.mixed.MixedIndex``: vertical-slash heads and block-sparse heads).

Helpers (all shapes documented; none builds an Nq x Nk tensor):

- ``pool(x, block, mode)``: mean/max pooling of tokens into blocks, ragged tail handled.
- ``gqa_scores(q, k, scale)``: q k^T per query head without repeating K for GQA.
- ``last_query_probs(q, k, last_q, scale, causal)``: softmax of the last queries over
  all keys (the MInference / FlexPrefill estimate), (B, Hq, L, Nk).
- ``diagonal_sums(probs, kv_len)``: mass of the estimate along each diagonal d = q - k.
- ``topk_mask`` / ``cumulative_mask``: top-k or smallest-set-reaching-gamma selection.
- ``causal_block_mask``, ``diagonal_block_mask``: block geometry of causal attention;
  ``anchor_block_mask``: the tiles of a sink + local band (forced by several estimators).
- ``block_pattern(block_mask, ...)``: a (B|1, H|1, nQB, nKB) bool block mask -> the
  BlockPattern the kernels run, with the causal element rule and full-tile hints.

Positions are absolute: query i of Nq sits at Nk - Nq + i (bottom-right aligned).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ...kernels import (
    BlockPattern,
    and_mods,
    causal_mod,
    count_allowed_pairs,
    lists_from_block_mask,
    run,
)
from ...kernels.mixed import (
    MixedIndex,
    mixed_attention,
    mixed_block_pattern,
    mixed_count_pairs,
)
from ...kernels.pattern import cdiv, slots_of, tile_ranges
from ..base import AttentionStats, Method, full_pairs

__all__ = [
    "DynamicMethod",
    "MixedPatternMethod",
    "anchor_block_mask",
    "block_pattern",
    "causal_block_mask",
    "cumulative_mask",
    "diagonal_block_mask",
    "diagonal_sums",
    "gqa_scores",
    "last_query_probs",
    "pool",
    "topk_mask",
]


class DynamicMethod(Method):
    """Base of content-aware sparse methods: ``estimate`` picks the pattern, a kernel runs it.

    Subclasses implement ``estimate`` (a BlockPattern, or a pattern with a kernel of its
    own: ``VerticalSlashIndex``, ``KeySlots``) and may override ``attend`` (several
    parts), ``count_pairs`` (an exact count cheaper than the generic one) and, when
    ``estimate`` returns another pattern type, ``to_block_pattern`` (called only when
    stats are wanted: ``stats.pattern`` is always a BlockPattern).
    """

    def estimate(self, q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> BlockPattern:
        """The pattern for these inputs. q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D).

        The pattern's kv_blocks may be per batch and head: (B|1, Hq|1, nQB, K).
        """
        raise NotImplementedError

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, scale: float, backend: str, want_lse: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """Attention over ``pattern`` -> (out (B, Hq, Nq, Dv), lse (B, Hq, Nq) or None, backend used)."""
        return run(pattern, q, k, v, scale, backend, return_lse=want_lse, method=self.name)

    def count_pairs(self, pattern, batch: int, heads: int) -> int:
        """Allowed (query, key) pairs of ``pattern`` summed over batch and heads."""
        return count_allowed_pairs(pattern, batch, heads)

    def to_block_pattern(self, pattern) -> BlockPattern:
        """The BlockPattern of what ``estimate`` returned (identity for BlockPatterns)."""
        return pattern

    def patterns(self, q, k, causal, scale):
        with torch.no_grad():
            return [self.estimate(q, k, causal, scale)]

    def forward(self, q, k, v, causal, scale, backend, want_stats, want_lse):
        start = time.perf_counter()
        with torch.no_grad():
            pattern = self.estimate(q, k, causal, scale)
        estimator_seconds = time.perf_counter() - start
        out, lse, used = self.attend(q, k, v, pattern, scale, backend, want_lse)
        density, block = float("nan"), None
        if want_stats:
            b, hq, nq = q.shape[:3]
            density = self.count_pairs(pattern, b, hq) / (full_pairs(nq, k.shape[2], causal) * b * hq)
            block = self.to_block_pattern(pattern)
        return out, lse, AttentionStats(self.name, density, block, estimator_seconds, used)


class MixedPatternMethod(DynamicMethod):
    """A dynamic method whose estimate is a ``MixedIndex`` (vertical-slash heads plus
    block-sparse heads): each group of heads runs on its own kernel."""

    def attend(self, q, k, v, pattern: MixedIndex, scale, backend, want_lse):
        return mixed_attention(q, k, v, pattern, scale, backend, self.name)

    def patterns(self, q, k, causal, scale):
        with torch.no_grad():
            index = self.estimate(q, k, causal, scale)
        return [p for p in (index.vs, index.bs) if p is not None]

    def count_pairs(self, pattern: MixedIndex, batch, heads):
        return mixed_count_pairs(pattern, batch)

    def to_block_pattern(self, pattern: MixedIndex):
        return mixed_block_pattern(pattern)


# --- pooling and scores -------------------------------------------------------------


def pool(x: torch.Tensor, block: int, mode: str = "mean") -> torch.Tensor:
    """(B, H, N, D) -> (B, H, ceil(N / block), D) pooled over consecutive tokens.

    ``mode``: "mean" (the ragged last block is averaged over its real tokens) or "max".
    """
    b, h, n, d = x.shape
    nb = cdiv(n, block)
    pad = nb * block - n
    if mode == "mean":
        xs = F.pad(x, (0, 0, 0, pad)).view(b, h, nb, block, d).sum(dim=3)
        counts = torch.full((nb,), float(block), dtype=xs.dtype, device=x.device)
        counts[-1] = block - pad
        return xs / counts.view(1, 1, nb, 1)
    if mode == "max":
        xs = F.pad(x, (0, 0, 0, pad), value=float("-inf")).view(b, h, nb, block, d)
        return xs.amax(dim=3)
    raise ValueError(f"pool mode must be 'mean' or 'max', got {mode!r}")


def gqa_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Scores per query head. q: (B, Hq, M, D); k: (B, Hkv, N, D) -> (B, Hq, M, N) float32+.

    The Hq / Hkv query heads of a group share one matmul with their KV head (K is never
    repeated).
    """
    b, hq, m, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(compute).reshape(b, hkv, (hq // hkv) * m, d)
    scores = torch.matmul(qg, k.to(compute).transpose(-1, -2)) * scale
    return scores.view(b, hq, m, n)


def last_query_probs(q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float, causal: bool) -> torch.Tensor:
    """Attention probabilities of the last ``last_q`` queries over all keys.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D) -> (B, Hq, L, Nk) with L = min(last_q, Nq),
    causal (bottom-right aligned) when ``causal``. Cost O(L * Nk) per head.
    """
    nq, nk = q.shape[2], k.shape[2]
    last = min(last_q, nq)
    scores = gqa_scores(q[:, :, nq - last :], k, scale)
    if causal:
        q_pos = torch.arange(nk - last, nk, device=q.device)[:, None]
        k_pos = torch.arange(nk, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.softmax(scores, dim=-1)


def diagonal_sums(probs: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Mass along each causal diagonal of the last-queries estimate.

    probs: (..., L, Nk), row r being the query at absolute position Nk - L + r.
    Returns (..., Nk) where entry d sums probs[r, k] over pairs with (Nk - L + r) - k = d.
    """
    last = probs.shape[-2]
    # Flip keys: entry (r, d) sits at column (L - 1 - r) + d, a constant-stride view.
    rev = F.pad(probs.flip(-1), (0, last)).contiguous()
    width = rev.shape[-1]
    lead = rev.shape[:-2]
    view = rev.as_strided(
        (*lead, last, kv_len),
        (*rev.stride()[:-2], width - 1, 1),
        rev.storage_offset() + last - 1,
    )
    return view.sum(dim=-2)


# --- selection ------------------------------------------------------------------------


def topk_mask(scores: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """bool mask of the ``k`` largest ``scores`` along the last dim (only among ``allowed``).

    k is clipped to the last dim; entries not allowed are never selected, so a row with
    fewer than k allowed entries selects all of them.
    """
    n = scores.shape[-1]
    k = max(0, min(int(k), n))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k == 0:
        return out
    idx = scores.topk(k, dim=-1).indices
    out.scatter_(-1, idx, True)
    if allowed is not None:
        out &= allowed
    return out


def cumulative_mask(weights: torch.Tensor, gamma: float, dim: int = -1) -> torch.Tensor:
    """bool mask of the smallest set of largest ``weights`` whose sum reaches gamma * total.

    weights: non-negative (-inf / NaN are not allowed; use 0 for excluded entries), any
    shape; selection along ``dim``. gamma in (0, 1]; the largest entry is always kept.
    """
    w = weights.movedim(dim, -1)
    sorted_w, order = w.sort(dim=-1, descending=True)
    total = sorted_w.sum(dim=-1, keepdim=True)
    before = sorted_w.cumsum(dim=-1) - sorted_w  # mass of strictly larger entries
    keep_sorted = before < gamma * total
    keep_sorted[..., 0] = True
    keep_sorted &= (sorted_w > 0) | (torch.arange(w.shape[-1], device=w.device) == 0)
    out = torch.zeros_like(keep_sorted)
    out.scatter_(-1, order, keep_sorted)
    return out.movedim(-1, dim)


# --- block geometry -------------------------------------------------------------------


def causal_block_mask(q_len: int, kv_len: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """(nQB, nKB) bool: tiles holding at least one causal pair (k <= q)."""
    _, q_hi, k_lo, _ = tile_ranges(q_len, kv_len, block_q, block_k, device)
    return k_lo <= q_hi


def diagonal_block_mask(q_len: int, kv_len: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """(nQB, nKB) bool: tiles holding a pair with k == q (every query's own position).

    Keeping these tiles guarantees every causal query row at least one key. For Nq > Nk
    (non-causal only) rows beyond the keys map to the last key block.
    """
    q_lo, q_hi, k_lo, k_hi = tile_ranges(q_len, kv_len, block_q, block_k, device)
    q_lo, q_hi = q_lo.clamp(0, kv_len - 1), q_hi.clamp(0, kv_len - 1)
    return (k_lo <= q_hi) & (k_hi >= q_lo)


def anchor_block_mask(
    q_len: int, kv_len: int, block_q: int, block_k: int, sink: int, local: int, device=None
) -> torch.Tensor:
    """(nQB, nKB) bool: tiles holding one of the first ``sink`` keys, or a key within
    ``local`` positions before (or at) one of the tile's queries: the attention-sink
    columns and the local band that StreamingLLM keeps (arXiv:2309.17453), in tiles.

    ``sink = local = 0`` gives no tile. Geometry is causal (keys at or before queries);
    the caller intersects with its causal mask.
    """
    q_lo, q_hi, k_lo, k_hi = tile_ranges(q_len, kv_len, block_q, block_k, device)
    sink_tiles = (k_lo < sink).expand(q_lo.shape[0], -1)
    band = (k_hi >= q_lo - local + 1) & (k_lo <= q_hi) if local > 0 else torch.zeros_like(sink_tiles)
    return sink_tiles | band


def _full_causal_tiles(q_len: int, kv_len: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """(nQB, nKB) bool: tiles whose every pair is causal and inside the sequence."""
    q_lo, _, _, k_hi = tile_ranges(q_len, kv_len, block_q, block_k, device)
    return k_hi <= q_lo


def block_pattern(
    block_mask: torch.Tensor,
    block_q: int,
    block_k: int,
    q_len: int,
    kv_len: int,
    causal: bool,
    mask_mod=None,
) -> BlockPattern:
    """A BlockPattern from a (nQB, nKB), (Hp, nQB, nKB) or (Bp, Hp, nQB, nKB) bool mask.

    Causal patterns get the causal element rule (ANDed with ``mask_mod`` if given) and
    non-causal tiles are dropped; tiles wholly below the diagonal are marked full (when
    there is no extra ``mask_mod``) so the kernels skip the element rule there.
    """
    mask = block_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    device = mask.device
    if causal:
        mask = mask & causal_block_mask(q_len, kv_len, block_q, block_k, device)
    lists = lists_from_block_mask(mask)
    full = None
    if mask_mod is None:
        if causal:
            full = slots_of(_full_causal_tiles(q_len, kv_len, block_q, block_k, device), lists)
        else:
            full = lists >= 0
    rule = and_mods(causal_mod, mask_mod) if causal else mask_mod
    return BlockPattern(
        kv_blocks=lists, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len, mask_mod=rule, full_tiles=full,
        position_only=mask_mod is None,
    )
