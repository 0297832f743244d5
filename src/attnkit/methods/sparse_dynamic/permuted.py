"""The base of methods that run block-sparse attention on *permuted* tokens
(``PermutedMethod``), and per-token tables read inside element rules (``lookup``).

Permuted methods (``routing``, ``pbs``, ``biformer``) reorder queries and/or keys so that
the pairs they want fall into few blocks, run the ordinary block kernel in the permuted
order and scatter the output back. Their element rule needs the original positions
(causality), which it reads from per-token tables with ``lookup``.

``PermutedMethod`` owns that flow: a subclass implements ``estimate_permuted`` and gets
the timed estimator, the permuted kernel run and stats whose ``pattern`` is an
equivalent pattern in the *original* token order (exact ``dense_mask()``, so attention
mass recall can be computed against q, k as given).

A permuted method may also keep *anchors* (``anchors()`` returns (sink, local) > 0):
the first ``sink`` keys and a local band of ``local`` keys before each query, computed
exactly in the original order. The permuted pattern then skips those pairs, both parts
return their log-sum-exp, and ``merge_partials`` combines them into attention over the
union — the local band cannot be one permuted block pattern (its keys are scattered
across the permuted order).

Positions are absolute: query i of Nq sits at Nk - Nq + i (bottom-right aligned).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...kernels import BlockPattern, lists_from_block_mask, merge_partials, run
from ...kernels.pattern import block_mask_from_lists, cdiv
from ..base import AttentionStats, full_pairs
from .common import DynamicMethod, anchor_block_mask, block_pattern


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


def gather_tokens(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """x: (B, H, N, D), perm: (Bp, Hp, S) original index of each slot -> (B, H, S, D).

    S may differ from N (key slots of a method whose key lists repeat or skip tokens)."""
    if perm is None:
        return x
    b, h, _, d = x.shape
    s = perm.shape[-1]
    idx = perm.expand(b, h, s).unsqueeze(-1).expand(b, h, s, d)
    return torch.gather(x, 2, idx)


def scatter_tokens(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
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

    q: (Bp, Hq|1, Nq) permutation or None (queries not permuted); k: (Bp, Hkv|1, S) or
    None. When ``k`` is not a permutation of the Nk keys (a key in several slots, or in
    none), give ``kv_len`` = Nk and ``rule``: the pattern's element rule in the original
    order, ``rule(b, h, q_pos, k_pos)`` with absolute positions (for stats).
    """

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    kv_len: int | None = None
    rule: object | None = None


def original_order_pattern(pattern: BlockPattern, perm: Permutation, group: int, kv_len: int | None = None) -> BlockPattern:
    """The pattern of ``pattern`` (which lives in permuted order) in the original token order.

    Lists every tile and decides each pair through the inverse permutations (or
    ``perm.rule`` when given), so it is exact but as slow as dense attention to *run*: it
    is for stats, tests and recall. ``kv_len``: the original key count (default: the
    pattern's).
    """
    if perm.rule is not None:
        return _all_tiles(pattern.q_len, perm.kv_len or kv_len or pattern.kv_len, pattern.block_q, pattern.block_k,
                          perm.rule, pattern.kv_blocks.device)
    listed = block_mask_from_lists(pattern.kv_blocks, pattern.num_kv_blocks)  # (Bp, Hp, nQB, nKB), permuted order
    inv_q = None if perm.q is None else inverse_permutation(perm.q)
    inv_k = None if perm.k is None else inverse_permutation(perm.k)
    off = pattern.q_offset

    def in_original_order(b, h, q_pos, k_pos):
        qs = q_pos if inv_q is None else lookup(inv_q, b, h, q_pos - off) + off
        ks = k_pos if inv_k is None else lookup(inv_k, b, h, k_pos, group)
        return _allowed(pattern, listed, b, h, qs, ks)

    return _all_tiles(pattern.q_len, pattern.kv_len, pattern.block_q, pattern.block_k, in_original_order, listed.device)


def _all_tiles(q_len: int, kv_len: int, block_q: int, block_k: int, rule, device) -> BlockPattern:
    """A pattern listing every tile, deciding pairs by ``rule`` (stats and tests only)."""
    nqb, nkb = cdiv(q_len, block_q), cdiv(kv_len, block_k)
    tiles = torch.arange(nkb, device=device).expand(1, 1, nqb, nkb).contiguous()
    return BlockPattern(kv_blocks=tiles, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len, mask_mod=rule)


def pattern_from_mask(mask: torch.Tensor, block_q: int, block_k: int, q_len: int, kv_len: int, mask_mod=None, full=None) -> BlockPattern:
    """BlockPattern from a (Bp, Hp, nQB, nKB) bool tile mask without any causal trimming
    (permuted orders have no positional block causality); ``full``: optional tile mask of
    tiles whose every pair is allowed."""
    lists = lists_from_block_mask(mask)
    full_tiles = None
    if full is not None:
        full_tiles = full.expand_as(mask).gather(-1, lists.clamp(min=0)) & (lists >= 0)
    return BlockPattern(kv_blocks=lists, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len, mask_mod=mask_mod, full_tiles=full_tiles)


def anchor_rule(sink: int, local: int, causal: bool):
    """Element rule of the anchors: key among the first ``sink``, or within ``local``
    positions of the query (before it when causal, either side otherwise)."""

    def anchored(b, h, q_pos, k_pos):
        dist = q_pos - k_pos
        band = ((dist >= 0) if causal else (dist > -local)) & (dist < local)
        return (k_pos < sink) | band

    return anchored


def anchor_pattern(q_len: int, kv_len: int, sink: int, local: int, causal: bool, block: int, device=None) -> BlockPattern:
    """The anchors (sink columns + local band) as a BlockPattern in the original order."""
    tiles = anchor_block_mask(q_len, kv_len, block, block, sink, local, device)
    if not causal and local > 0:  # the band reaches ``local - 1`` keys past the query too
        q_lo = (torch.arange(cdiv(q_len, block), device=device) * block + kv_len - q_len)[:, None]
        k_lo = (torch.arange(cdiv(kv_len, block), device=device) * block)[None, :]
        tiles = tiles | ((k_lo <= q_lo + block - 1 + local - 1) & (k_lo + block - 1 >= q_lo))
    pattern = block_pattern(tiles, block, block, q_len, kv_len, causal, mask_mod=anchor_rule(sink, local, causal))
    pattern.position_only = True
    return pattern


def _without_anchors(pattern: BlockPattern, perm: Permutation, sink: int, local: int, causal: bool, group: int,
                     kv_len: int) -> BlockPattern:
    """``pattern`` (permuted order) minus the anchor pairs, judged on original positions
    (``kv_len``: the original key count). Its ``full_tiles`` are kept: a method with
    anchors marks a tile full only when none of its pairs is an anchor pair."""
    rule, anchored, off = pattern.mask_mod, anchor_rule(sink, local, causal), pattern.q_offset
    orig_off = kv_len - pattern.q_len

    def not_anchored(b, h, q_pos, k_pos):
        qs = q_pos - off + orig_off if perm.q is None else lookup(perm.q, b, h, q_pos - off) + orig_off
        ks = k_pos if perm.k is None else lookup(perm.k, b, h, k_pos, group)
        ok = ~anchored(b, h, qs, ks)
        return ok if rule is None else ok & rule(b, h, q_pos, k_pos)

    return BlockPattern(kv_blocks=pattern.kv_blocks, block_q=pattern.block_q, block_k=pattern.block_k,
                        q_len=pattern.q_len, kv_len=pattern.kv_len, mask_mod=not_anchored, full_tiles=pattern.full_tiles)


def _union(a: BlockPattern, b: BlockPattern) -> BlockPattern:
    """Pattern allowing the pairs of either (both in the original order, same geometry)."""
    nkb = a.num_kv_blocks
    listed_a, listed_b = block_mask_from_lists(a.kv_blocks, nkb), block_mask_from_lists(b.kv_blocks, nkb)

    def either(bb, h, q_pos, k_pos):
        return _allowed(a, listed_a, bb, h, q_pos, k_pos) | _allowed(b, listed_b, bb, h, q_pos, k_pos)

    return BlockPattern(kv_blocks=lists_from_block_mask(listed_a | listed_b), block_q=a.block_q, block_k=a.block_k,
                        q_len=a.q_len, kv_len=a.kv_len, mask_mod=either)


def _allowed(p: BlockPattern, listed: torch.Tensor, b, h, q_pos, k_pos):
    """Whether ``p`` (its tiles: ``listed`` (Bp, Hp, nQB, nKB)) allows (q_pos, k_pos)."""
    lb, lh = listed.shape[:2]
    q_blk = ((q_pos - p.q_offset) // p.block_q).clamp(0, p.num_q_blocks - 1)
    ok = listed[b % lb, h % lh, q_blk, (k_pos // p.block_k).clamp(0, p.num_kv_blocks - 1)]
    return ok if p.mask_mod is None else ok & p.mask_mod(b, h, q_pos, k_pos)


class PermutedMethod(DynamicMethod):
    """A dynamic method whose pattern lives in a permuted token order.

    Subclasses implement ``estimate_permuted(q, k, causal, scale) -> (pattern, Permutation)``;
    the pattern's element rule receives *permuted* positions (use ``lookup`` on original
    position tables). ``stats.pattern`` is the equivalent pattern in the *original* order.
    Subclasses with anchors override ``anchors``; such a subclass may mark tiles of its
    permuted pattern full (``full_tiles``, the kernel then skips their element rule) only
    where every pair is allowed *and* none is an anchor pair. The permuted part and the
    anchors each run on a kernel of the kernel layer (a forced ``backend`` on both) and
    merge by log-sum-exp; gathering and scattering the tokens is differentiable.
    """

    def estimate_permuted(self, q, k, causal: bool, scale: float) -> tuple[BlockPattern, Permutation]:
        raise NotImplementedError

    def anchors(self) -> tuple[int, int]:
        """(sink, local): keys kept exactly beside the permuted pattern; (0, 0) for none."""
        return 0, 0

    def _parts(self, q, k, causal, scale):
        """(main pattern with the anchor pairs excluded, its permutation, anchor pattern or None)."""
        with torch.no_grad():
            pattern, perm = self.estimate_permuted(q, k, causal, scale)
        sink, local = self.anchors()
        if sink <= 0 and local <= 0:
            return pattern, perm, None
        group = q.shape[1] // k.shape[1]
        anchors = anchor_pattern(q.shape[2], k.shape[2], sink, local, causal, self.anchor_block(pattern), q.device)
        return self.exclude_anchors(pattern, perm, sink, local, causal, group, k.shape[2]), perm, anchors

    def anchor_block(self, pattern) -> int:
        return pattern.block_k

    def exclude_anchors(self, pattern, perm, sink, local, causal, group, kv_len):
        """The main pattern minus the anchor pairs (judged on original positions)."""
        return _without_anchors(pattern, perm, sink, local, causal, group, kv_len)

    def patterns(self, q, k, causal, scale):
        pattern, _, anchors = self._parts(q, k, causal, scale)
        return [pattern] if anchors is None else [pattern, anchors]

    def forward(self, q, k, v, causal, scale, backend, want_stats, want_lse):
        start = time.perf_counter()
        pattern, perm, anchors = self._parts(q, k, causal, scale)
        estimator_seconds = time.perf_counter() - start
        out, lse, used = self.attend_permuted(q, k, v, pattern, perm, scale, backend, want_lse or anchors is not None)
        if anchors is not None:
            out_a, lse_a, used_a = run(anchors, q, k, v, scale, backend, return_lse=True, method=self.name)
            out, lse = merge_partials([(out, lse), (out_a, lse_a)])
            used = f"{used}+{used_a}"
        density, stats_pattern = float("nan"), pattern
        if want_stats:
            b, hq, nq = q.shape[:3]
            group = hq // k.shape[1]
            pairs = self.main_pairs(pattern, b, hq)
            stats_pattern = self.main_in_original_order(pattern, perm, group, k.shape[2])
            if anchors is not None:
                pairs += self.count_pairs(anchors, b, hq)
                stats_pattern = _union(stats_pattern, anchors)
            density = pairs / (full_pairs(nq, k.shape[2], causal) * b * hq)
        return out, lse, AttentionStats(self.name, density, stats_pattern, estimator_seconds, used)

    def attend_permuted(self, q, k, v, pattern, perm, scale: float, backend: str, want_lse: bool):
        """The main part in the original query order: (out (B, Hq, Nq, Dv), lse (B, Hq, Nq),
        backend). Default: gather the permuted tokens, run the pattern, scatter back."""
        qp, kp, vp = gather_tokens(q, perm.q), gather_tokens(k, perm.k), gather_tokens(v, perm.k)
        out_p, lse_p, used = run(pattern, qp, kp, vp, scale, backend, return_lse=want_lse, method=self.name)
        lse = None if lse_p is None else scatter_tokens(lse_p.unsqueeze(-1), perm.q)[..., 0]
        return scatter_tokens(out_p, perm.q), lse, used

    def main_pairs(self, pattern, batch: int, heads: int) -> int:
        return self.count_pairs(pattern, batch, heads)

    def main_in_original_order(self, pattern, perm, group: int, kv_len: int) -> BlockPattern:
        return original_order_pattern(pattern, perm, group, kv_len)
