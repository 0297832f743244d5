"""MoBA: per-token top-k gating of key blocks by q . mean(k_block), plus the current block.

Paper: Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs",
arXiv:2502.13189 (2025). Keys are split into blocks of ``block_size``; each query token t
scores every block wholly in its past by s_i = q_t . mean(K_i) (parameter-free gate),
always takes its current block (the one holding position t, causally masked inside),
never a future block, and attends to the ``topk`` blocks in all (current included).

Algorithm here, two granularities (``granularity``):
- "block" (default, fast): the gate runs once per kernel query tile of 64 tokens with the
  tile's mean query — by linearity mean_t(q_t . kbar_i) = qbar . kbar_i, i.e. the tile's
  average gate score — and the tile's top-k blocks (its own MoBA block(s) forced) are
  plain key blocks of the block kernel, with no per-token rule. Deviation: tokens of one
  tile share their blocks.
- "token" (the paper's exact semantics): the gate per token, a chunk of queries at a time
  (scores (chunk, N / block_size), never N x N); the chosen blocks go into a
  (B, Hq, Nq, N / block_size) bool table that the element rule reads, so every query
  attends to precisely its own blocks. A query tile lists the union of its tokens'
  blocks (tiles chosen by all its tokens, wholly causal, are marked full). Exact but
  slower on the CPU: the union is wider than k blocks and the element rule runs on most
  tiles.

Defaults: block_size 512, topk 3 — the paper's setting for 8k-32k training (sparsity
1 - 3*512/32768 = 95% at 32k); its 1M-token setting is block 4096, top-12. At 4k the
default keeps 3 of 8 blocks, at 16k 3 of 32, at 64k 3 of 128: the density falls as 1/N.
Deliberate deviation: non-causal attention (not in the paper) gates over all blocks and
still forces the query's own block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ... import validate
from ...kernels.pattern import cdiv
from ...registry import register
from ._shared_extra import lookup_2d
from .common import DynamicMethod, block_pattern, gqa_scores, pool

_CHUNK_ELEMS = 1 << 24
_KERNEL_BLOCK = 64


@register(
    "moba",
    family="dynamic_sparse",
    paper="MoBA: Mixture of Block Attention for Long-Context LLMs",
    arxiv="2502.13189",
    year=2025,
)
class MoBA(DynamicMethod):
    """Each query token attends to its top-k key blocks by q . mean(k_block), its own block always included."""

    @dataclass
    class Config:
        block_size: int = 512
        topk: int = 3
        granularity: str = "block"

    def check_config(self) -> None:
        validate.check_positive(self.name, block_size=self.config.block_size, topk=self.config.topk)
        validate.check_choice(self.name, "granularity", self.config.granularity, ("block", "token"))

    def estimate(self, q, k, causal, scale):
        if self.config.granularity == "block":
            return self._estimate_per_tile(q, k, causal, scale)
        mb, topk = self.config.block_size, self.config.topk
        b, hq, nq, _ = q.shape
        nk = k.shape[2]
        off = nk - nq
        nmb = cdiv(nk, mb)
        centroids = pool(k.float(), mb, "mean")  # (B, Hkv, nMB, D)
        table = torch.zeros(b, hq, nq, nmb, dtype=torch.bool, device=q.device)
        block_lo = torch.arange(nmb, device=q.device) * mb
        chunk = max(1, _CHUNK_ELEMS // max(1, b * hq * nmb))
        for q0 in range(0, nq, chunk):
            q1 = min(nq, q0 + chunk)
            scores = gqa_scores(q[:, :, q0:q1], centroids, scale)  # (B, Hq, c, nMB)
            pos = torch.arange(q0, q1, device=q.device)[:, None] + off
            own = (pos.clamp(0, nk - 1) // mb) == torch.arange(nmb, device=q.device)[None, :]
            if causal:
                scores = scores.masked_fill(block_lo[None, :] > pos, float("-inf"))
            scores = scores.masked_fill(own, float("inf"))
            valid = scores > float("-inf")
            idx = scores.topk(min(topk, nmb), dim=-1).indices
            table[:, :, q0:q1].scatter_(-1, idx, True)
            table[:, :, q0:q1] &= valid
        return _token_table_pattern(table, mb, nq, nk, causal)


    def _estimate_per_tile(self, q, k, causal, scale):
        mb, topk = self.config.block_size, self.config.topk
        nq, nk = q.shape[2], k.shape[2]
        off = nk - nq
        bq, bk = _KERNEL_BLOCK, math.gcd(mb, _KERNEL_BLOCK)
        nmb, nqb, nkb = cdiv(nk, mb), cdiv(nq, bq), cdiv(nk, bk)
        scores = gqa_scores(pool(q.float(), bq, "mean"), pool(k.float(), mb, "mean"), scale)  # (B, Hq, nQB, nMB)
        q_lo = (torch.arange(nqb, device=q.device) * bq + off).clamp(0, nk - 1)
        q_hi = (torch.arange(nqb, device=q.device) * bq + bq - 1 + off).clamp(0, min(nk, nq + off) - 1)
        blocks = torch.arange(nmb, device=q.device)
        own = (blocks[None, :] >= (q_lo // mb)[:, None]) & (blocks[None, :] <= (q_hi // mb)[:, None])
        if causal:
            scores = scores.masked_fill(blocks[None, :] * mb > q_hi[:, None], float("-inf"))
        scores = scores.masked_fill(own, float("inf"))
        idx = scores.topk(min(topk, nmb), dim=-1).indices
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=q.device).scatter_(-1, idx, True)
        keep = (keep & (scores > float("-inf"))) | own
        keep = keep.repeat_interleave(mb // bk, dim=-1)[..., :nkb]
        return block_pattern(keep, bq, bk, nq, nk, causal)


def _token_table_pattern(table: torch.Tensor, mb: int, nq: int, nk: int, causal: bool):
    """BlockPattern for a per-token table of chosen key blocks. table: (B, Hq, Nq, nMB) bool."""
    b, hq, _, nmb = table.shape
    bq, bk = _KERNEL_BLOCK, math.gcd(mb, _KERNEL_BLOCK)
    nqb = cdiv(nq, bq)
    pad = nqb * bq - nq
    tiles = torch.nn.functional.pad(table, (0, 0, 0, pad)).view(b, hq, nqb, bq, nmb)
    union = tiles.any(dim=3)  # (B, Hq, nQB, nMB)
    # Every real token of the tile chose the block (padded rows count as choosing it).
    real = (torch.arange(nqb * bq, device=table.device) < nq).view(1, 1, nqb, bq, 1)
    every = (tiles | ~real).all(dim=3)
    per = mb // bk
    nkb = cdiv(nk, bk)
    union = union.repeat_interleave(per, dim=-1)[..., :nkb]
    every = every.repeat_interleave(per, dim=-1)[..., :nkb]
    off = nk - nq

    def moba_rule(bb, h, q_pos, k_pos):
        return lookup_2d(table, bb, h, q_pos - off, k_pos // mb)

    pattern = block_pattern(union, bq, bk, nq, nk, causal, mask_mod=moba_rule)
    # Speed hint: tiles every token chose, and (causal) wholly in the past.
    full = every
    if causal:
        q_lo = torch.arange(nqb, device=table.device)[:, None] * bq + off
        k_hi = (torch.arange(nkb, device=table.device)[None, :] + 1) * bk - 1
        full = full & (k_hi <= q_lo)
    full = full & ((torch.arange(nkb, device=table.device) + 1) * bk <= nk)
    lists = pattern.kv_blocks
    pattern.full_tiles = full.gather(-1, lists.clamp(min=0)) & (lists >= 0)
    return pattern
