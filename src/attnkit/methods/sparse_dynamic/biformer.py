"""BiFormer bi-level routing attention on a 2D grid of tokens.

Paper: Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention",
arXiv:2303.08810 (CVPR 2023). The H x W token grid (raster order) is split into
S_h x S_w regions. Region-level routing: per-region mean of queries and of keys give a
region affinity matrix A_r = Q_r K_r^T; each region keeps the indices of its ``topk``
most affine regions. Token-level attention: every query of a region attends to all the
tokens of its routed regions (gathered key/value).

Algorithm here: exactly that, per batch and query head (routing from the KV head's keys):
tokens are permuted to region-major order so each region is one contiguous tile of
(H/S_h)(W/S_w) tokens, the routed regions become the tile's key-block list, the shared
block-sparse kernel runs on the permuted tokens and the output is scattered back. The
estimate is (S_h S_w)^2 region scores — nothing N x N.

Config: ``grid=(H, W)`` (0, 0 = infer a square grid from N), ``regions`` per side
(S_h, S_w) (the paper uses 7 x 7), ``topk`` regions (paper: 1, 4, 16, S^2 by stage).
Non-causal only (images). Deliberate deviations: the local context enhancement (a learned
depthwise convolution on V added to the output) is a trained module and is left out;
H and W must be multiples of the region counts (the paper pads the feature map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ... import validate
from ...registry import register
from .common import gqa_scores, pool, topk_mask
from .permuted import Permutation, PermutedMethod, pattern_from_mask


@register(
    "biformer",
    family="dynamic_sparse",
    paper="BiFormer: Vision Transformer with Bi-Level Routing Attention",
    arxiv="2303.08810",
    year=2023,
    supports=("non_causal", "gqa"),
)
class BiFormer(PermutedMethod):
    """Region-to-region top-k routing on a 2D grid, then token attention within the routed regions."""

    @dataclass
    class Config:
        grid: tuple = (0, 0)
        regions: tuple = (7, 7)
        topk: int = 4

    def check_config(self) -> None:
        c = self.config
        validate.check_positive(self.name, topk=c.topk)
        for key in ("grid", "regions"):
            value = getattr(c, key)
            if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in value)):
                raise ValueError(f"{key} of method {self.name!r} must be a pair of integers (rows, cols), got {value!r}")
        if min(c.regions) < 1:
            raise ValueError(f"regions of method {self.name!r} must be >= 1 per side, got {c.regions!r}")
        if min(c.grid) < 0:
            raise ValueError(f"grid of method {self.name!r} must be (H, W) >= 1, or (0, 0) for a square grid, got {c.grid!r}")

    def geometry(self, n: int) -> tuple[int, int, int, int]:
        """(H, W, S_h, S_w) for a sequence of n tokens; ValueError when they do not fit."""
        h, w = self.config.grid
        if (h, w) == (0, 0):
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"method {self.name!r}: N={n} is not a square; pass grid=(H, W) with H*W = N")
            h = w = side
        if h * w != n:
            raise ValueError(f"method {self.name!r}: grid={h}x{w} holds {h * w} tokens but N={n}")
        sh, sw = self.config.regions
        if h % sh or w % sw:
            raise ValueError(f"method {self.name!r}: grid {h}x{w} is not divisible into regions={sh}x{sw}")
        return h, w, sh, sw

    def estimate_permuted(self, q, k, causal, scale):
        nq, nk = q.shape[2], k.shape[2]
        if nq != nk:
            raise ValueError(f"method {self.name!r} needs Nq == Nk (one token grid), got Nq={nq}, Nk={nk}")
        h, w, sh, sw = self.geometry(nk)
        perm = region_major_order(h, w, sh, sw, q.device).view(1, 1, nk)
        size = (h // sh) * (w // sw)
        qr = pool(torch.gather(q.float(), 2, perm.expand(*q.shape[:2], nk).unsqueeze(-1).expand(*q.shape)), size, "mean")
        kr = pool(torch.gather(k.float(), 2, perm.expand(*k.shape[:2], nk).unsqueeze(-1).expand(*k.shape)), size, "mean")
        affinity = gqa_scores(qr, kr, scale)  # (B, Hq, R, R)
        keep = topk_mask(affinity, self.config.topk)
        return pattern_from_mask(keep, size, size, nq, nk, full=keep), Permutation(q=perm, k=perm)


def region_major_order(h: int, w: int, sh: int, sw: int, device) -> torch.Tensor:
    """(H*W,) raster index of each token in region-major order (regions in raster order,
    tokens in raster order inside each region)."""
    rh, rw = h // sh, w // sw
    idx = torch.arange(h * w, device=device).view(sh, rh, sw, rw)
    return idx.permute(0, 2, 1, 3).reshape(-1)
