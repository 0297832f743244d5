"""Gated DeltaNet: the delta rule with a data-dependent per-head decay (Qwen3-Next's layer).

Paper: Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta
Rule", arXiv:2412.06464 (2024).

S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T, o_t = S_t^T
(scale q_t), with ``g`` (B, Hv, N) a log-space decay (<= 0, one per value head and token)
and ``beta`` (B, Hv, N) in [0, 1], both inputs. The semantics and argument meaning of
transformers' ``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule``
(Qwen3-Next, Qwen3.5, OLMo-hybrid), in attnkit's (B, H, N, D) layout: q, k share Hk
heads, v has Hv = a multiple of Hk (value head h reads q/k head h // (Hv / Hk)), and
``use_qk_l2norm`` (default True, as those models call it). Forms: ``chunk`` (the paper's
chunkwise WY algorithm, ``delta_rule.py``), ``recurrent`` (decode), ``parallel`` (one
chunk over the whole sequence). Deviations: the operator only (short convolutions, the
gate and beta projections, the gated output norm are the layer's); the decay's
cumulative sum is float64 (transformers: float32). Causal only.
State: ``KVState`` (S (B, Hv, Dk, Dv)).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...registry import register
from . import delta_rule
from .delta import DeltaConfig, DeltaRuleMethod


@register(
    "gated_delta",
    family="linear",
    paper="Gated Delta Networks: Improving Mamba2 with Delta Rule",
    arxiv="2412.06464",
    year=2024,
    supports=("causal", "decode", "gqa"),
)
class GatedDeltaNet(DeltaRuleMethod):
    """Gated DeltaNet: the delta rule with a per-head decay gate g (an input)."""

    inputs = ("g", "beta", "initial_state")
    decay = "head"
    chunk_fn = staticmethod(delta_rule.gated_delta_rule_chunk)
    recurrent_fn = staticmethod(delta_rule.gated_delta_rule_recurrent)

    @dataclass
    class Config(DeltaConfig):
        pass
