"""RetNet's retention (the recurrent / chunkwise form, no group norm).

Paper: Sun et al., "Retentive Network: A Successor to Transformer for Large Language
Models", arXiv:2307.08621 (2023).

S_n = gamma_h S_{n-1} + k_n v_n^T, o_n = scale q_n^T S_n: o_n = scale sum_{m <= n}
gamma_h^(n-m) (q_n . k_m) v_m, with the paper's fixed per-head decay
gamma_h = 1 - 2^(-5-h), h = 0 .. H-1 (its code: ``decay = log(1 - 2**(-5 - arange(H)))``).
Deviations: the operator only — xPos / rotary on q, k, the group norm and the swish gate
of the retention layer belong to the model around it; ``scale`` defaults to 1/sqrt(Dk)
(the paper scales k by Dk^-0.5). H is the key/value head count (the state heads); with
GQA the query heads of a group share their state head's gamma. Causal only.
State: ``KVState`` (S (B, Hkv, Dk, Dv)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from .base import LinearConfig, LinearMethod


def retnet_log_decay(heads: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H,) log(gamma_h), gamma_h = 1 - 2^(-5-h)."""
    h = torch.arange(heads, dtype=torch.float64, device=device)
    return torch.log1p(-(2.0 ** (-5.0 - h))).to(dtype)


@register(
    "retnet",
    family="linear",
    paper="Retentive Network: A Successor to Transformer for Large Language Models",
    arxiv="2307.08621",
    year=2023,
    supports=("causal", "decode", "gqa"),
)
class RetNet(LinearMethod):
    """Retention: linear attention with a fixed per-head exponential decay gamma_h."""

    @dataclass
    class Config(LinearConfig):
        pass

    def log_decay(self, k, inputs):
        b, h, n = k.shape[:3]
        return retnet_log_decay(h, torch.float64, k.device)[None, :, None].expand(b, h, n)

    def run(self, q, k, v, causal, scale, form, inputs):
        return self.run_decay(q, k, v, causal, scale, form, self.log_decay(k, inputs), inputs)
