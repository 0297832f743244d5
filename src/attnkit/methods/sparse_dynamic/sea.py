"""SEA: a linear-attention estimate of the attention map, top-k per query, then sparse attention.

Paper: Lee et al., "SEA: Sparse Linear Attention with Estimated Attention Mask",
arXiv:2310.01777 (ICLR 2024). SEA runs a kernel-based linear attention (Performer) to
estimate the attention matrix at a compressed key resolution, keeps the top-k entries of
each query row of the estimate, and computes exact sparse attention on that mask. Its
estimator (the linear attention plus a small CNN decoder) is *trained* by distillation.

Training-free variant here: the estimate is the Performer FAVOR+ positive random-feature
map itself, phi(x) = exp(W x - |x|^2 / 2) / sqrt(m) with W ~ N(0, I) (m = ``features``
rows, seeded), applied to q and k scaled by scale^(1/2) so that
E[phi(q) . phi(k)] = exp(scale q . k). For query i and key block J the estimated
attention mass is
    P(i, J) = phi(q_i) . S_J / phi(q_i) . S_all(i),   S_J = sum_{j in J} phi(k_j),
with S_all(i) the sum over the keys query i may see (a prefix sum under causal masking):
an unbiased-numerator estimate of the row-normalised attention of i summed over J —
the compressed-resolution row SEA decodes. Nothing N x N is built: the estimate per
query block is (sum_{i in block} phi(q_i) / phi(q_i) . S_all(i)) . S_J, a
(nQB x m) @ (m x nKB) product.

Then per query block: keep the ``topk`` key blocks of largest estimated mass among those
not kept anyway (causal: the diagonal block, the first block and, when set, the tiles of
the first ``sink`` keys and of the ``local`` keys up to each query), and run the shared
block-sparse kernel.

Deliberate deviations: no trained estimator/decoder (random features instead); top-k is
taken per query *block* of 64 (the kernel's tile) from the block-summed per-query
estimates instead of per query; random features use a fixed seed (``seed``) so the
pattern is deterministic; the optional ``sink`` / ``local`` anchors (StreamingLLM's) are
not in the paper and are off by default. Defaults: block_size 64, topk 16 blocks,
features 64, sink 0, local 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import validate
from ...kernels.pattern import cdiv
from ...registry import register
from .common import (
    DynamicMethod,
    anchor_block_mask,
    block_pattern,
    causal_block_mask,
    diagonal_block_mask,
    topk_mask,
)


@register(
    "sea",
    family="dynamic_sparse",
    paper="SEA: Sparse Linear Attention with Estimated Attention Mask",
    arxiv="2310.01777",
    year=2023,
)
class SEA(DynamicMethod):
    """Top-k key blocks per query block from a random-feature (Performer) estimate of attention."""

    @dataclass
    class Config:
        block_size: int = 64
        topk: int = 16
        features: int = 64
        seed: int = 0
        sink: int = 0
        local: int = 0

    def check_config(self) -> None:
        c = self.config
        validate.check_positive(self.name, block_size=c.block_size, topk=c.topk, features=c.features)
        validate.check_non_negative(self.name, sink=c.sink, local=c.local)

    def estimate(self, q, k, causal, scale):
        c = self.config
        bs = c.block_size
        nq, nk = q.shape[2], k.shape[2]
        mass = estimated_block_mass(q, k, bs, scale, causal, c.features, c.seed)
        allowed = None
        if causal:
            # The top-k are picked among the blocks not kept anyway (sink, local band, diagonal).
            forced = diagonal_block_mask(nq, nk, bs, bs, q.device) | anchor_block_mask(nq, nk, bs, bs, c.sink, c.local, q.device)
            forced[..., 0] = True
            allowed = causal_block_mask(nq, nk, bs, bs, q.device) & ~forced
        keep = topk_mask(mass, c.topk, allowed)
        if causal:
            keep = keep | forced
        return block_pattern(keep, bs, bs, nq, nk, causal)


def random_features(x: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """log of FAVOR+ positive features, (B, H, N, m): W x' - |x'|^2 / 2 with x' = x scale^(1/2)."""
    xs = x.float() * scale**0.5
    return torch.matmul(xs, w.t()) - 0.5 * (xs * xs).sum(-1, keepdim=True)


def estimated_block_mass(
    q: torch.Tensor, k: torch.Tensor, block: int, scale: float, causal: bool, features: int, seed: int
) -> torch.Tensor:
    """Estimated attention mass of each key block summed over each query block's queries.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D) -> (B, Hq, nQB, nKB) float32 (each query
    contributes its estimated row distribution, which sums to 1 over its visible keys).
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    nqb, nkb = cdiv(nq, block), cdiv(nk, block)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(features, d, generator=gen).to(q.device)
    # Per-head constants cancel in the row normalisation: subtract maxima for stability.
    lk = random_features(k, w, scale)
    lk = lk - lk.amax(dim=(2, 3), keepdim=True)
    phi_k = lk.exp()  # (B, Hkv, Nk, m)
    lq = random_features(q, w, scale)
    phi_q = (lq - lq.amax(dim=-1, keepdim=True)).exp()  # (B, Hq, Nq, m)
    block_sum = F.pad(phi_k, (0, 0, 0, nkb * block - nk)).view(b, hkv, nkb, block, features).sum(3)
    if causal:
        prefix = phi_k.cumsum(dim=2)  # visible keys of query i: 0 .. Nk - Nq + i
        visible = prefix[:, :, nk - nq :].repeat_interleave(group, dim=1)
    else:
        visible = phi_k.sum(dim=2, keepdim=True).repeat_interleave(group, dim=1)
    denom = (phi_q * visible).sum(-1, keepdim=True).clamp(min=1e-30)
    weighted = F.pad(phi_q / denom, (0, 0, 0, nqb * block - nq)).view(b, hq, nqb, block, features).sum(3)
    wg = weighted.view(b, hkv, group * nqb, features)
    return torch.matmul(wg, block_sum.transpose(-1, -2)).view(b, hq, nqb, nkb)
