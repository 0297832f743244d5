"""Kimi Delta Attention (KDA): the gated delta rule with one decay per key channel.

Paper: Kimi Team, "Kimi Linear: An Expressive, Efficient Attention Architecture",
arXiv:2510.26692 (2025).

S_t = diag(exp(g_t)) S_{t-1}, then the delta rule S_t += k_t (beta_t (v_t - S_t^T k_t))^T,
o_t = S_t^T (scale q_t), with ``g`` (B, Hv, N, Dk) a log-space decay (<= 0) per value head,
token and key channel, and ``beta`` (B, Hv, N) in [0, 1] (inputs). The semantics of
transformers' ``chunk_kimi_delta_attention`` / ``recurrent_kimi_delta_attention``
(Kimi-Linear), in attnkit's layout, with ``use_qk_l2norm`` default True as Kimi-Linear
calls it. Forms: ``chunk`` (``delta_rule.py``: the intra-chunk per-channel decays are
applied by halving blocks, never as a (C, C, Dk) tensor), ``recurrent`` (decode),
``parallel`` (one chunk over the whole sequence). Deviations: the operator only (short
convolutions, the low-rank gate, beta and the output norm are the layer's);
``chunk_size`` must be a power of two; value-head grouping (Hv = m Hk) is accepted, as
for ``gated_delta`` (transformers' Kimi fallback has Hv = Hk); l2norm is x * rsqrt(.)
(Kimi writes x / sqrt(.), equal up to rounding). Causal only.
State: ``KVState`` (S (B, Hv, Dk, Dv)).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...registry import register
from . import delta_rule
from .delta import DeltaConfig, DeltaRuleMethod


@register(
    "kda",
    family="linear",
    paper="Kimi Linear: An Expressive, Efficient Attention Architecture",
    arxiv="2510.26692",
    year=2025,
    supports=("causal", "decode", "gqa"),
)
class KDA(DeltaRuleMethod):
    """Kimi Delta Attention: the delta rule with a per-channel decay gate g (an input)."""

    inputs = ("g", "beta", "initial_state")
    decay = "channel"
    chunk_fn = staticmethod(delta_rule.kda_chunk)
    recurrent_fn = staticmethod(delta_rule.kda_recurrent)

    def check_config(self) -> None:
        super().check_config()
        c = self.config.chunk_size
        if isinstance(c, int) and c & (c - 1):
            raise ValueError(f"chunk_size of method 'kda' must be a power of two (its chunked form halves blocks), "
                             f"got {c}")

    @dataclass
    class Config(DeltaConfig):
        pass
