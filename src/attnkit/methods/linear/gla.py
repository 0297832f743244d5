"""Gated Linear Attention (GLA).

Paper: Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with
Hardware-Efficient Training", arXiv:2312.06635 (2023).

S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t, with data-dependent gates
alpha_t = exp(g_t) given in log space: ``g`` (B, Hkv, N, Dk) one per key channel (the
paper's), or (B, Hkv, N) one per head; every g <= 0. The chunked form follows the paper's
chunkwise algorithm in log space: within a chunk one rescaled matmul when the chunk's
decay span is bounded, else blocks halved until it is (the role of the paper's secondary
chunking); the state across chunks (``chunked.py``).
Deviations: the operator only (the gate's low-rank projection and logsigmoid / 16, the
output norm and swish gate belong to the layer); ``scale`` defaults to 1/sqrt(Dk) as in
the paper's code. Causal only. State: ``KVState`` (S (B, Hkv, Dk, Dv)).
"""

from __future__ import annotations

from dataclasses import dataclass

from ... import validate
from ...registry import register
from .base import LinearConfig, LinearMethod


@register(
    "gla",
    family="linear",
    paper="Gated Linear Attention Transformers with Hardware-Efficient Training",
    arxiv="2312.06635",
    year=2023,
    supports=("causal", "decode", "gqa"),
)
class GLA(LinearMethod):
    """Linear attention with data-dependent per-channel decay gates g (an input)."""

    inputs = ("g", "initial_state")

    @dataclass
    class Config(LinearConfig):
        pass

    def check_inputs(self, q, k, v, causal, inputs, check_finite=True):
        super().check_inputs(q, k, v, causal, inputs, check_finite)
        if inputs.get("g") is None:
            raise ValueError("method 'gla' needs its gates: pass g, a log-space decay (<= 0) of shape "
                             "(B, Hkv, N, Dk) or (B, Hkv, N)")
        b, h, n, dk = k.shape
        validate.check_log_decay(inputs["g"], b, h, n, dk, q)

    def log_decay(self, k, inputs):
        return inputs["g"]

    def run(self, q, k, v, causal, scale, form, inputs):
        return self.run_decay(q, k, v, causal, scale, form, self.log_decay(k, inputs), inputs)
