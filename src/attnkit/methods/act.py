"""ACT: training-free attention calibration of hidden attention sinks.

Paper: Yu, Wang, Fu, Shi, Shaikh, Lin, "Unveiling and Harnessing Hidden Attention Sinks:
Enhancing Large Language Models without Training through Attention Calibration",
arXiv:2406.15765 (ICML 2024).

Per calibrated query head: A = softmax attention; key j is a sink when its mean
attention over the queries that see it, sum_i A_ij / #{i sees j}, exceeds ``threshold``;
the first such key (the initial sink) is left alone (the reference code's criterion and
defaults: threshold 0.1, beta 0.4). Each row's mass on the other sinks S is scaled by
``beta`` and the removed mass goes to the row's other keys in proportion to their
attention:

    A'_ij = beta A_ij (j in S),   A'_ij = A_ij (1 - beta a_S) / (1 - a_S) (j not in S),

a_S = sum_{j in S} A_ij; every row of A' still sums to 1. Computed without an N x N map:
the output is exact attention's corrected by each row's a_S and o_S = sum_{j in S} A_ij v_j
(a few sink columns), and the column means come from one blockwise pass with the
log-sum-exp (O(N^2) time, O(block x N) memory).

Deviations: the paper picks the heads to calibrate on a dataset, one head at a time,
keeping those that help; here ``heads`` lists them (None: every head; e.g. the heads
``attnkit analyze`` finds with hidden sinks, per layer through ``ak.apply``). At most
``max_sinks`` sinks per head (the largest means). A row whose whole mass is on sinks is
left unchanged (the reference divides 0 by 0). Decode steps of a patched model run exact
attention (the method is a prefill method); no log-sum-exp is returned (A' is not a
softmax of the scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import validate
from ..kernels import attention_with_lse
from ..registry import register
from .base import AttentionStats, OwnKernelMethod

BLOCK_ELEMENTS = 1 << 22  # scores held at once by the column-mean pass (16 MiB in fp32)


@register(
    "act",
    family="exact",
    paper="Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training "
          "through Attention Calibration",
    arxiv="2406.15765",
    year=2024,
    supports=("causal", "non_causal", "gqa"),
    kinds=("prefill",),
)
class ACT(OwnKernelMethod):
    """Exact attention with the mass on hidden sinks scaled by ``beta`` and redistributed."""

    own_backend = "exact"

    @dataclass
    class Config:
        beta: float = 0.4
        threshold: float = 0.1
        heads: Optional[list] = None
        max_sinks: int = 64

    def check_config(self) -> None:
        c = self.config
        if not 0.0 <= c.beta <= 1.0:
            raise ValueError(f"act: beta must be in [0, 1] (the share of a sink's attention kept), got {c.beta!r}")
        if not 0.0 < c.threshold <= 1.0:
            raise ValueError(f"act: threshold must be in (0, 1] (a key's mean attention), got {c.threshold!r}")
        validate.check_positive(self.name, max_sinks=c.max_sinks)
        if c.heads is not None and (not isinstance(c.heads, (list, tuple))
                                    or not all(isinstance(h, int) and h >= 0 for h in c.heads)):
            raise ValueError(f"act: heads must be None (every head) or a list of query head indices >= 0, "
                             f"got {c.heads!r}")

    def compatible_backends(self, q, k, v, causal=False, scale=None, training=False, return_lse=False):
        return [] if return_lse else [self.own_backend]

    def forward(self, q, k, v, causal, scale, backend, want_stats, want_lse):
        self.check_backend(backend)
        if want_lse:
            raise ValueError("method 'act' changes the attention distribution: it returns no log-sum-exp "
                             "(return_lse=False)")
        out, lse = attention_with_lse(q, k, v, scale, causal)
        heads = self._heads(q.shape[1])
        if heads:
            out = calibrate(out, lse, q, k, v, scale, causal, heads, self.config)
        return out, None, AttentionStats(self.name, 1.0, None, 0.0, "exact")

    def _heads(self, hq: int) -> list[int]:
        if self.config.heads is None:
            return list(range(hq))
        bad = [h for h in self.config.heads if h >= hq]
        if bad:
            raise ValueError(f"act: heads {bad} out of range for Hq={hq} query heads (allowed 0..{hq - 1})")
        return sorted(set(self.config.heads))


def calibrate(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scale: float, causal: bool, heads: list[int], config) -> torch.Tensor:
    """ACT's correction of exact attention ``out`` (B, Hq, Nq, Dv) on query heads ``heads``.
    lse: (B, Hq, Nq); q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D)."""
    group = q.shape[1] // k.shape[1]
    idx = torch.tensor(heads, device=q.device)
    qh, lh = q[:, idx], lse[:, idx]
    kh, vh = k[:, idx // group], v[:, idx // group]
    with torch.no_grad():
        sinks = find_sinks(column_means(qh, kh, lh, scale, causal), config.threshold, config.max_sinks)
    valid = sinks >= 0  # (B, h, m)
    pos = sinks.clamp(min=0)
    ks = torch.gather(kh, 2, pos[..., None].expand(-1, -1, -1, kh.shape[-1]))
    vs = torch.gather(vh, 2, pos[..., None].expand(-1, -1, -1, vh.shape[-1]))
    logits = (qh @ ks.transpose(-1, -2)) * scale  # (B, h, Nq, m)
    allowed = valid[:, :, None, :]
    if causal:
        rows = torch.arange(qh.shape[2], device=q.device) + (kh.shape[2] - qh.shape[2])
        allowed = allowed & (pos[:, :, None, :] <= rows[None, None, :, None])
    a = (logits - lh[..., None]).exp().masked_fill(~allowed, 0.0)
    a_s = a.sum(-1, keepdim=True)  # (B, h, Nq, 1)
    o_s = a.to(vs.dtype) @ vs
    oh = out[:, idx]
    keep = a_s < 1.0 - 1e-6  # rows with mass off the sinks
    factor = torch.where(keep, (1.0 - config.beta * a_s) / (1.0 - a_s).clamp(min=1e-6), torch.ones_like(a_s))
    beta = torch.where(keep, torch.full_like(a_s, config.beta), torch.ones_like(a_s))
    new = (beta * o_s + factor * (oh - o_s)).to(out.dtype)
    return out.index_copy(1, idx, new)


def column_means(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """Mean attention each key receives from the queries that see it: (B, h, Nk), float32.
    q: (B, h, Nq, D), k: (B, h, Nk, D), lse: (B, h, Nq); blocks of query rows (no Nq x Nk map)."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    offset = nk - nq  # causal is bottom-right aligned: row i sees keys j <= i + offset
    rows = max(1, min(nq, BLOCK_ELEMENTS // max(1, b * h * nk)))
    sums = q.new_zeros(b, h, nk, dtype=torch.float32)
    cols = torch.arange(nk, device=q.device)
    for start in range(0, nq, rows):
        blk = slice(start, min(nq, start + rows))
        p = ((q[:, :, blk] @ k.transpose(-1, -2)) * scale - lse[:, :, blk, None]).float().exp()
        if causal:
            r = torch.arange(blk.start, blk.stop, device=q.device) + offset
            p = p.masked_fill(cols[None, :] > r[:, None], 0.0)
        sums += p.sum(dim=2)
    seen_by = torch.full((nk,), float(nq), device=q.device)
    if causal:
        seen_by = (nq - (cols - offset).clamp(min=0)).clamp(min=0).float()
    return sums / seen_by.clamp(min=1.0)


def find_sinks(means: torch.Tensor, threshold: float, max_sinks: int) -> torch.Tensor:
    """Sink keys per head: mean > threshold, the first such key excluded, at most
    ``max_sinks`` (largest means). means: (B, h, Nk) -> indices (B, h, m), -1 padded."""
    above = means > threshold
    first = torch.where(above, torch.arange(means.shape[-1], device=means.device), means.shape[-1]).amin(-1)
    above = above.scatter(-1, first.clamp(max=means.shape[-1] - 1)[..., None], False)
    m = min(max_sinks, max(1, int(above.sum(-1).max())))
    top = means.masked_fill(~above, -1.0).topk(m, dim=-1)
    return torch.where(top.values > threshold, top.indices, -1)
