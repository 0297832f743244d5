"""Lightning Attention-2 (TransNormerLLM's linear attention with decay).

Papers: Qin et al., "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence
Lengths in Large Language Models", arXiv:2401.04658 (2024); Qin et al., "TransNormerLLM: A
Faster and Better Large Language Model with Improved TransNormer", arXiv:2307.14995 (2023).

o_t = scale sum_{s <= t} lambda_h^(t-s) (q_t . k_s) v_s with a fixed per-head decay
lambda_h = exp(-slope_h), slope_h = decay_scale * 2^(-8 (h+1) / H) (ALiBi's slopes, as
TransNormerLLM and MiniMax-01 use; MiniMax also multiplies by a per-layer factor, which
is ``decay_scale`` here). Lightning Attention-2's algorithm, intra-block exact attention
with the decay matrix plus an inter-block state carried block to block, is exactly the
chunked form of the shared kernel (``chunked.chunk_gla`` with a per-head decay; the
block size is ``chunk_size``), so this method is that kernel with these slopes: the same
computation as ``retnet`` with other decays. Deviations: the operator only (the SiLU
feature map on q, k, the output norm and gate are the model's). ``scale`` defaults to 1,
unscaled as in the papers and transformers' ``MiniMaxLightningAttention``. Causal only.
State: ``KVState`` (S (B, Hkv, Dk, Dv)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from .base import LinearConfig, LinearMethod


def lightning_slopes(heads: int, device: torch.device) -> torch.Tensor:
    """(H,) float64 slopes 2^(-8 (h+1) / H)."""
    h = torch.arange(heads, dtype=torch.float64, device=device)
    return 2.0 ** (-8.0 * (h + 1) / heads)


@register(
    "lightning",
    family="linear",
    paper="Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models",
    arxiv="2401.04658",
    year=2024,
    supports=("causal", "decode", "gqa"),
)
class Lightning(LinearMethod):
    """Linear attention with a fixed per-head decay exp(-slope_h), computed block-wise."""

    unit_scale = True

    @dataclass
    class Config(LinearConfig):
        decay_scale: float = 1.0

    def check_config(self) -> None:
        super().check_config()
        if not self.config.decay_scale >= 0:
            raise ValueError(f"decay_scale of method 'lightning' must be >= 0, got {self.config.decay_scale!r}")

    def log_decay(self, k, inputs):
        b, h, n = k.shape[:3]
        return (-self.config.decay_scale * lightning_slopes(h, k.device))[None, :, None].expand(b, h, n)

    def run(self, q, k, v, causal, scale, form, inputs):
        return self.run_decay(q, k, v, causal, scale, form, self.log_decay(k, inputs), inputs)
