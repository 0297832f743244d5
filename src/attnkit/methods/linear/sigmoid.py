"""Sigmoid self-attention: out_i = sum_j sigmoid(scale q_i . k_j + b) v_j.

Paper: Ramapuram, Danieli, Dhekane, Weers, Busbridge, Ablin, Likhomanenko, Digani, Gu,
Shidani, Webb, "Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
arXiv:2409.04431 (2024). b = -log(n), n the sequence length (here Nk, the keys a query
may see at most); ``bias`` sets another constant. Each weight is its own sigmoid: no
normaliser over the keys, so there is no log-sum-exp to return and no softmax kernel to
reuse. The kernel here (FlashSigmoid's idea on the CPU) walks tiles of ``block_size``
queries x ``block_size`` keys with matmuls, skips tiles outside the causal / window band,
masks only the tiles that straddle its edge, and its backward (an autograd Function)
recomputes each tile: dS = sigmoid'(s) * (dO V^T), so nothing but q, k, v is saved and
no step holds more than one (block x block) tile per head.

Deviations / options: ``window`` W > 0 keeps the keys at distance i - j in [0, W) when
causal and |i - j| < W otherwise (``sliding_window``'s rule; FlashSigmoid's window_size);
b stays -log(Nk) with a window (the paper sets b from the sequence length). The paper's
ALiBi / RoPE and its LayerScale, QK-norm advice belong to the model layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ... import validate
from ...registry import register
from ..base import full_pairs
from .quadratic import QuadraticMethod
from .state import state_dtype

INF = 1 << 62  # no bound on a distance


def band(causal: bool, window: int) -> tuple[int, int]:
    """(lo, hi): query position p may see key j iff lo <= p - j <= hi."""
    hi = window - 1 if window > 0 else INF
    lo = 0 if causal else (-(window - 1) if window > 0 else -INF)
    return lo, hi


def tiles(nq: int, nk: int, causal: bool, window: int, block: int) -> Iterator[tuple[int, int, int, int, bool]]:
    """(r0, r1, j0, j1, full): the tiles of query rows [r0, r1) x keys [j0, j1) that hold an
    allowed pair; ``full``: every pair of the tile is allowed (no mask needed). Query row i
    sits at position Nk - Nq + i (bottom-right aligned)."""
    lo, hi = band(causal, window)
    offset = nk - nq
    for r0 in range(0, nq, block):
        r1 = min(nq, r0 + block)
        p0, p1 = r0 + offset, r1 - 1 + offset
        first, last = max(0, p0 - hi), min(nk - 1, p1 - lo)  # keys some row of the block may see
        for j0 in range(first, last + 1, block):
            j1 = min(last + 1, j0 + block)
            yield r0, r1, j0, j1, (p0 - (j1 - 1) >= lo) and (p1 - j0 <= hi)


def tile_mask(r0: int, r1: int, j0: int, j1: int, offset: int, lo: int, hi: int, device) -> torch.Tensor:
    """(r, 1, s) bool: allowed pairs of a tile (the 1 broadcasts over the query heads of a group)."""
    d = (torch.arange(r0 + offset, r1 + offset, device=device)[:, None]
         - torch.arange(j0, j1, device=device)[None, :])
    return ((d >= lo) & (d <= hi))[:, None, :]


def density(nq: int, nk: int, causal: bool, window: int) -> float:
    """Allowed pairs / pairs of the full causal (or full) mask."""
    lo, hi = band(causal, window)
    p = torch.arange(nq, dtype=torch.long) + (nk - nq)
    seen = ((p - lo).clamp(max=nk - 1) - (p - hi).clamp(min=0) + 1).clamp(min=0).sum().item()
    return float(seen) / full_pairs(nq, nk, causal)


def _layout(q: torch.Tensor, heads: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """(B, Hq, N, D) -> (B * Hkv, N * G, D), the G query heads of a KV head adjacent per row."""
    b, hq, n, d = q.shape
    x = q.to(dtype).reshape(b, heads, hq // heads, n, d).transpose(2, 3) * scale
    return x.reshape(b * heads, n * (hq // heads), d)


def _unlayout(x: torch.Tensor, b: int, hq: int, heads: int, n: int) -> torch.Tensor:
    return x.view(b, heads, n, hq // heads, x.shape[-1]).transpose(2, 3).reshape(b, hq, n, x.shape[-1])


class _Geometry:
    """Shapes, band and bias of one call; ``probs`` recomputes a tile (forward and backward)."""

    def __init__(self, q, k, v, causal, window, block, bias):
        self.b, self.hq, self.nq, _ = q.shape
        self.heads, self.nk = k.shape[1], k.shape[2]
        self.group = self.hq // self.heads
        self.causal, self.window, self.block, self.bias = causal, window, block, bias
        self.lo, self.hi = band(causal, window)

    def tiles(self):
        return tiles(self.nq, self.nk, self.causal, self.window, self.block)

    def probs(self, qs, k3, r0, r1, j0, j1, full):
        """sigmoid(s) of one tile, (B * Hkv, r * G, s), 0 on masked pairs."""
        g = self.group
        p = torch.bmm(qs[:, r0 * g:r1 * g], k3[:, j0:j1].transpose(1, 2)).add_(self.bias).sigmoid_()
        if not full:
            mask = tile_mask(r0, r1, j0, j1, self.nk - self.nq, self.lo, self.hi, p.device)
            p.view(p.shape[0], r1 - r0, g, j1 - j0).masked_fill_(~mask, 0.0)
        return p


def _inputs(q, k, v, geo: _Geometry, scale: float):
    dtype = state_dtype(q.dtype)
    qs = _layout(q, geo.heads, scale, dtype)
    k3 = k.to(dtype).reshape(geo.b * geo.heads, geo.nk, k.shape[-1])
    v3 = v.to(dtype).reshape(geo.b * geo.heads, geo.nk, v.shape[-1])
    return qs, k3, v3


class SigmoidAttentionFunction(torch.autograd.Function):
    """out = sigmoid(scale q k^T + b) v over the allowed pairs, tile by tile; backward
    recomputes every tile (saves q, k, v only)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, bias: float, causal: bool, window: int, block: int):
        geo = _Geometry(q, k, v, causal, window, block, bias)
        qs, k3, v3 = _inputs(q, k, v, geo, scale)
        out = qs.new_zeros(qs.shape[0], qs.shape[1], v.shape[-1])
        g = geo.group
        for r0, r1, j0, j1, full in geo.tiles():
            out[:, r0 * g:r1 * g].baddbmm_(geo.probs(qs, k3, r0, r1, j0, j1, full), v3[:, j0:j1])
        ctx.save_for_backward(q, k, v)
        ctx.args = (scale, bias, causal, window, block)
        return _unlayout(out, geo.b, geo.hq, geo.heads, geo.nq).to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        scale, bias, causal, window, block = ctx.args
        geo = _Geometry(q, k, v, causal, window, block, bias)
        qs, k3, v3 = _inputs(q, k, v, geo, scale)
        do = _layout(dout, geo.heads, 1.0, qs.dtype)
        dq, dk, dv = torch.zeros_like(qs), torch.zeros_like(k3), torch.zeros_like(v3)
        g = geo.group
        for r0, r1, j0, j1, full in geo.tiles():
            rows = slice(r0 * g, r1 * g)
            p = geo.probs(qs, k3, r0, r1, j0, j1, full)
            dv[:, j0:j1].baddbmm_(p.transpose(1, 2), do[:, rows])
            ds = torch.bmm(do[:, rows], v3[:, j0:j1].transpose(1, 2)).mul_(p).mul_(1.0 - p)  # 0 where masked
            dq[:, rows].baddbmm_(ds, k3[:, j0:j1])
            dk[:, j0:j1].baddbmm_(ds.transpose(1, 2), qs[:, rows])
        dq = _unlayout(dq, geo.b, geo.hq, geo.heads, geo.nq).mul_(scale)
        dk = dk.view(k.shape)
        dv = dv.view(v.shape)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def sigmoid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: Optional[float] = None,
                      causal: bool = False, window: int = 0, block: int = 256) -> torch.Tensor:
    """The blockwise kernel. q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) ->
    (B, Hq, Nq, Dv) in q's dtype (computed in float32, float64 for float64). bias None: -log(Nk)."""
    bias = -math.log(k.shape[2]) if bias is None else float(bias)
    return SigmoidAttentionFunction.apply(q, k, v, scale, bias, causal, window, block)


@register(
    "sigmoid",
    family="linear",
    paper="Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
    arxiv="2409.04431",
    year=2024,
    supports=("causal", "non_causal", "decode", "gqa"),
)
class SigmoidAttention(QuadraticMethod):
    """Softmax-free attention sigmoid(q k^T scale + b) v, b = -log(n), in a blockwise kernel."""

    @dataclass
    class Config:
        bias: Optional[float] = None  # None: -log(Nk), the paper's
        window: int = 0  # 0: every key; W > 0: the W nearest (most recent when causal)
        block_size: int = 256

    def check_config(self) -> None:
        validate.check_non_negative(self.name, window=self.config.window)
        validate.check_positive(self.name, block_size=self.config.block_size)
        if self.config.bias is not None and not math.isfinite(self.config.bias):
            raise ValueError(f"bias of method 'sigmoid' must be a finite float or None (-log Nk), got {self.config.bias}")

    def run(self, q, k, v, causal, scale):
        c = self.config
        out = sigmoid_attention(q, k, v, scale, c.bias, causal, c.window, c.block_size)
        return out, density(q.shape[2], k.shape[2], causal, c.window)
