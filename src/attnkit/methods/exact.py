"""Exact (dense) attention: the kernel layer's one exact attention-with-lse function.

Paper: Vaswani et al., "Attention Is All You Need", arXiv:1706.03762 (2017). On the CPU it
is PyTorch's fused flash-attention kernel (the one SDPA runs), called so that it also
returns the log-sum-exp and back-propagates through it (``kernels.exact``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels import attention_with_lse
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

    def patterns(self, q, k, causal, scale):
        return []

    def compatible_backends(self, q, k, v, causal=False, scale=None, training=False, return_lse=False):
        return ["exact"]

    def forward(self, q, k, v, causal, scale, backend, want_stats, want_lse):
        if backend not in ("auto", "exact"):
            raise ValueError(f"method 'full' runs on the exact kernel; backend must be 'auto' or 'exact', got {backend!r}")
        out, lse = attention_with_lse(q, k, v, scale, causal)
        return out, lse, AttentionStats(self.name, 1.0, None, 0.0, "exact")
