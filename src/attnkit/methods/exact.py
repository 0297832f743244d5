"""Exact (dense) attention: the kernel layer's one exact attention-with-lse function.

Paper: Vaswani et al., "Attention Is All You Need", arXiv:1706.03762 (2017). On the CPU it
is PyTorch's fused flash-attention kernel (the one SDPA runs), called so that it also
returns the log-sum-exp and back-propagates through it (``kernels.exact``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels import attention_with_lse
from ..registry import register
from .base import AttentionStats, OwnKernelMethod


@register(
    "full",
    family="exact",
    paper="Attention Is All You Need",
    arxiv="1706.03762",
    year=2017,
    supports=("causal", "non_causal", "decode", "gqa"),
    kinds=("prefill",),
)
class Full(OwnKernelMethod):
    """Dense exact attention; the baseline every method is measured against."""

    own_backend = "exact"

    @dataclass
    class Config:
        pass

    def forward(self, q, k, v, causal, scale, backend, want_stats, want_lse):
        self.check_backend(backend)
        out, lse = attention_with_lse(q, k, v, scale, causal)
        return out, lse, AttentionStats(self.name, 1.0, None, 0.0, "exact")
