"""Block gating from pooled q/k (SeerAttention, training-free) or antidiagonal scores (XAttention).

Papers:
- Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs",
  arXiv:2410.13276 (2024). The AttnGate pools q (average) and k (max, min and average)
  over blocks of tokens, scores every (query block, key block) pair with the pooled
  vectors, applies a softmax per query block and keeps the top-k blocks or those above
  a threshold; a block-sparse FlashAttention then runs on the kept blocks.
- Xu et al., "XAttention: Block Sparse Attention with Antidiagonal Scoring",
  arXiv:2503.16428 (2025). Importance of a block = the sum of its antidiagonal
  entries taken every ``stride`` positions: queries are regrouped as
  concat(q[S-1], q[S-2], ..., q[0]) per stride group and keys as concat(k[0..S-1]),
  so one dot product of regrouped vectors is the sum of an antidiagonal of an S x S
  sub-tile. The (N/S x N/S) regrouped scores (scaled by 1/(sqrt(D) S)) are softmaxed
  per row and summed per block; blocks are kept until their cumulative share reaches
  ``threshold`` (0.9 in the paper).

Algorithm here (per batch, query head and query block of ``block_size`` tokens):
1. score every key block:
   - ``scoring="pooled"``, ``pooling="mean"``: mean(q_block) . mean(k_block) * scale;
   - ``scoring="pooled"``, ``pooling="max"``: sum_c max(qbar_c kmax_c, qbar_c kmin_c) *
     scale, an upper bound of max_j qbar . k_j built from SeerAttention's max- and
     min-pooled keys;
   - ``scoring="antidiagonal"``: XAttention's strided antidiagonal sums (computed a chunk
     of query blocks at a time: at most (N/S)^2 / chunks scores live at once, never N x N).
2. softmax over the key blocks the query block may see (causal: blocks not in its future);
3. keep the ``topk`` best blocks, or (``threshold`` set) the smallest set whose softmax
   mass reaches ``threshold``;
4. causal: always add the diagonal block (every query sees itself) and the first block
   (attention sink);
5. run the shared block-sparse kernel on the result (exact attention inside kept blocks).

Deliberate deviations: SeerAttention's gate is *trained* (linear layers after pooling);
this is the training-free pooled score, with the max/min pooling used as a bound instead
of learned weights. XAttention's optional "keep sink / keep recent" and per-head
threshold calibration are replaced by the forced first and diagonal blocks above.
Defaults: block 64 (kernel tile; SeerAttention uses 64, XAttention 128), topk 16 blocks
(1024 keys plus diagonal and sink), XAttention stride 8 (paper's text default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ... import validate
from ...kernels.pattern import cdiv
from ...registry import register
from .common import (
    DynamicMethod,
    block_pattern,
    causal_block_mask,
    cumulative_mask,
    diagonal_block_mask,
    gqa_scores,
    pool,
    topk_mask,
)

# Scores held at once by the antidiagonal estimator (floats), per chunk of query blocks.
_CHUNK_ELEMS = 1 << 24


@register(
    "block_topk",
    family="dynamic_sparse",
    paper="SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs",
    arxiv="2410.13276",
    year=2024,
)
class BlockTopK(DynamicMethod):
    """Top-k (or cumulative-threshold) key blocks per query block from pooled or antidiagonal block scores."""

    @dataclass
    class Config:
        block_size: int = 64
        topk: int = 16
        threshold: Optional[float] = None
        scoring: str = "pooled"
        pooling: str = "mean"
        stride: int = 8

    def check_config(self) -> None:
        c = self.config
        validate.check_positive(self.name, block_size=c.block_size, topk=c.topk, stride=c.stride)
        validate.check_choice(self.name, "scoring", c.scoring, ("pooled", "antidiagonal"))
        validate.check_choice(self.name, "pooling", c.pooling, ("mean", "max"))
        if c.threshold is not None and not 0.0 < c.threshold <= 1.0:
            raise ValueError(f"threshold of method {self.name!r} must be in (0, 1] or None, got {c.threshold!r}")
        if c.scoring == "antidiagonal" and c.block_size % c.stride:
            raise ValueError(
                f"block_size={c.block_size} of method {self.name!r} must be a multiple of stride={c.stride} "
                f"for antidiagonal scoring"
            )

    def estimate(self, q, k, causal, scale):
        c = self.config
        bs = c.block_size
        nq, nk = q.shape[2], k.shape[2]
        allowed = causal_block_mask(nq, nk, bs, bs, q.device) if causal else None
        if c.scoring == "antidiagonal":
            probs = antidiagonal_block_probs(q, k, bs, c.stride, scale, causal)
        else:
            scores = pooled_block_scores(q, k, bs, scale, c.pooling)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        if c.threshold is not None:
            keep = cumulative_mask(probs, c.threshold)
        else:
            keep = topk_mask(probs, c.topk, allowed)
        if causal:
            keep = keep | diagonal_block_mask(nq, nk, bs, bs, q.device)
            keep[..., 0] = True
        return block_pattern(keep, bs, bs, nq, nk, causal)


def pooled_block_scores(q: torch.Tensor, k: torch.Tensor, block: int, scale: float, pooling: str) -> torch.Tensor:
    """(B, Hq, nQB, nKB) block scores from pooled q and k. q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D).

    pooling "mean": qbar . kbar; "max": sum_c max(qbar_c kmax_c, qbar_c kmin_c), an upper
    bound of the best single key's score against the mean query.
    """
    q_bar = pool(q.float(), block, "mean")
    if pooling == "mean":
        return gqa_scores(q_bar, pool(k.float(), block, "mean"), scale)
    k_max = pool(k.float(), block, "max")
    k_min = -pool(-k.float(), block, "max")
    return gqa_scores(q_bar.clamp(min=0), k_max, scale) + gqa_scores(q_bar.clamp(max=0), k_min, scale)


def antidiagonal_block_probs(q: torch.Tensor, k: torch.Tensor, block: int, stride: int, scale: float, causal: bool) -> torch.Tensor:
    """XAttention block importance: (B, Hq, nQB, nKB), each row summing to 1 (0 rows if no key).

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D). Regrouped scores are (N/stride)^2 per head,
    computed a chunk of query blocks at a time.
    """
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    nqb, nkb = cdiv(nq, block), cdiv(nk, block)
    per = block // stride  # stride groups per block
    qr = _regroup(q.float(), nqb * block, stride, reverse=True)  # (B, Hq, nQB*per, S*D)
    kr = _regroup(k.float(), nkb * block, stride, reverse=False)  # (B, Hkv, nKB*per, S*D)
    off = nk - nq
    k_group_lo = torch.arange(nkb * per, device=q.device) * stride
    out = torch.zeros(b, hq, nqb, nkb, dtype=torch.float32, device=q.device)
    chunk = max(1, _CHUNK_ELEMS // max(1, b * hq * per * nkb * per))
    for q0 in range(0, nqb, chunk):
        q1 = min(nqb, q0 + chunk)
        s = gqa_scores(qr[:, :, q0 * per : q1 * per], kr, scale / stride)  # (B, Hq, rows, nKB*per)
        q_group_hi = torch.arange(q0 * per, q1 * per, device=q.device) * stride + stride - 1
        invalid = (k_group_lo[None, :] >= nk) | (q_group_hi[:, None] - (stride - 1) >= nq)
        if causal:
            invalid = invalid | (k_group_lo[None, :] > q_group_hi[:, None] + off)
        s = s.masked_fill(invalid, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        out[:, :, q0:q1] = p.view(b, hq, q1 - q0, per, nkb, per).sum(dim=(3, 5))
    norm = out.sum(dim=-1, keepdim=True)
    return torch.where(norm > 0, out / norm.clamp(min=1e-30), out)


def _regroup(x: torch.Tensor, length: int, stride: int, reverse: bool) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, length/stride, stride*D): each group of ``stride`` tokens
    concatenated (in reverse order for queries, so group dot products sum antidiagonals)."""
    b, h, n, d = x.shape
    x = F.pad(x, (0, 0, 0, length - n)).view(b, h, length // stride, stride, d)
    if reverse:
        x = x.flip(3)
    return x.reshape(b, h, length // stride, stride * d)
