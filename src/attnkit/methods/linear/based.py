"""Based: linear attention with the 2nd-order Taylor feature map of exp(q . k).

Paper: Arora, Eyuboglu, Zhang, Timalsina, Alberti, Zinsley, Zou, Rudra, Ré, "Simple linear
attention language models balance the recall-throughput tradeoff", arXiv:2402.18668
(ICML 2024).

phi(x) = [1, x', (x' ⊗ x') / sqrt(2)], x' = x scale^(1/2), so that
phi(q) . phi(k) = 1 + s q.k + (s q.k)^2 / 2, the 2nd-order Taylor expansion of exp(s q.k)
(s = scale, default 1/sqrt(Dk): x' = x / Dk^(1/4) and x ⊗ x / (sqrt(2) sqrt(Dk)), the
scaling of the paper's code ``TaylorExp``); 1 + Dk + Dk^2 features.
o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps), eps = 1e-12 as in the paper's code.

The paper's architecture is a hybrid of *layers*: Taylor linear-attention layers,
small sliding-window softmax layers (tens to a few hundred tokens; 64 in the paper's
main discussion, 128 in a released config) and gated short convolutions, assigned per
layer (its code's ``alt_mixer_layers`` / ``alt_mixer_2_layers`` lists); no single layer
adds a window term to the linear one. So ``based`` is the Taylor linear attention, and
the window layers are ``sliding_window`` (e.g. ``window=64``), assigned per layer by a
plan; the state is the linear part's only (no window K/V). Deviations: the paper's q, k projection to a small
feature dim (16) belongs to the layer: the map takes q, k as given (Dk is that feature
dim; Dk = 64 gives 4161 features, so a model's full head dim is slow); the full
x ⊗ x is kept (its symmetric half would give the same kernel with fewer features).
Causal and non-causal. State: ``LinearState`` (S (B, Hkv, 1 + Dk + Dk^2, Dv),
z (B, Hkv, 1 + Dk + Dk^2)).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...registry import register
from .base import LinearConfig, LinearMethod, run_normalized
from .state import LinearState, state_dtype


def taylor_features(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x: (..., N, D) -> (..., N, 1 + D + D^2): [1, x', vec(x' ⊗ x') / sqrt(2)], x' = x scale^(1/2)."""
    xs = x * scale**0.5
    outer = (xs.unsqueeze(-1) * xs.unsqueeze(-2)).flatten(-2) * 0.5**0.5
    return torch.cat([torch.ones_like(xs[..., :1]), xs, outer], dim=-1)


@register(
    "based",
    family="linear",
    paper="Simple linear attention language models balance the recall-throughput tradeoff",
    arxiv="2402.18668",
    year=2024,
    supports=("causal", "non_causal", "decode", "gqa"),
)
class Based(LinearMethod):
    """Linear attention on the 2nd-order Taylor features of exp(scale q . k)."""

    State = LinearState

    @dataclass
    class Config(LinearConfig):
        eps: float = 1e-12

    def check_config(self) -> None:
        super().check_config()
        if not self.config.eps >= 0:
            raise ValueError(f"eps of method 'based' must be >= 0, got {self.config.eps!r}")

    def state_shapes(self, q, k, v):
        b, h, dk, dv = k.shape[0], k.shape[1], k.shape[-1], v.shape[-1]
        f = 1 + dk + dk * dk
        return {"S": (b, h, f, dv), "z": (b, h, f)}

    def run(self, q, k, v, causal, scale, form, inputs):
        dtype = state_dtype(q.dtype)
        state = inputs.get("initial_state")
        s0, z0 = (None, None) if state is None else (state.S, state.z)
        out, s, z = run_normalized(form, q.to(dtype), k.to(dtype), v.to(dtype), s0, z0, causal, self.config.chunk_size,
                                   self.config.eps, feature=functools.partial(taylor_features, scale=scale))
        return out, LinearState(S=s, z=z)
