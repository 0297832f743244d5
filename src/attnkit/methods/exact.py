"""Exact (dense) attention through ``torch.nn.functional.scaled_dot_product_attention``.

Paper: Vaswani et al., "Attention Is All You Need", arXiv:1706.03762 (2017). The fused
SDPA kernels (FlashAttention on GPU, a flash-style CPU kernel) compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels import sdpa
from ..registry import register
from .base import AttentionStats, Method


@register(
    "full",
    family="exact",
    paper="Attention Is All You Need",
    arxiv="1706.03762",
    year=2017,
    supports=("causal", "non_causal", "decode", "gqa"),
    kinds=("prefill",),
)
class Full(Method):
    """Dense exact attention (SDPA); the baseline every method is measured against."""

    @dataclass
    class Config:
        pass

    def forward(self, q, k, v, causal, scale, backend, want_stats):
        if backend not in ("auto", "sdpa", "dense"):
            raise ValueError(f"method 'full' runs on SDPA; backend must be 'auto', 'sdpa' or 'dense', got {backend!r}")
        out = sdpa(q, k, v, causal, scale)
        return out, AttentionStats(self.name, 1.0, None, 0.0, "sdpa")
