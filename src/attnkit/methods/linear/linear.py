"""Linear attention with a positive feature map.

Paper: Katharopoulos, Vyas, Pappas, Fleuret, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention", arXiv:2006.16236 (2020).

o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps), S_i = sum_{j <= i} phi(k_j) v_j^T,
z_i = sum_{j <= i} phi(k_j) (every j when non-causal), phi = elu(x) + 1 as in the paper.
Deviations / options: ``feature_map`` also "relu" and "identity"; ``normalize=False`` drops
the denominator; ``eps`` (the paper writes none) keeps a zero denominator finite; ``scale``
(default 1, the paper's) multiplies phi(q). The normaliser is computed by the shared
kernel as one more value column of ones, so every form carries z with S exactly; the
chunked form applies the feature map and the division a row of chunks at a time.
State: ``LinearState`` (S (B, Hkv, Dk, Dv), z (B, Hkv, Dk), None when not normalised).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ... import validate
from ...registry import register
from .base import LinearConfig, LinearMethod
from .chunked import run_form
from .state import LinearState, state_dtype

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu1": lambda x: x.clamp(max=0.0).exp_() + F.relu(x),  # elu(x) + 1 in fewer passes; elu'(0) = 1
    "relu": F.relu,
    "identity": lambda x: x,
}


@register(
    "linear",
    family="linear",
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
    arxiv="2006.16236",
    year=2020,
    supports=("causal", "non_causal", "decode", "gqa"),
)
class LinearAttention(LinearMethod):
    """Kernelised attention phi(q) phi(k)^T v, normalised by phi(q) sum phi(k)."""

    State = LinearState
    unit_scale = True

    @dataclass
    class Config(LinearConfig):
        feature_map: str = "elu1"
        normalize: bool = True
        eps: float = 1e-6

    def check_config(self) -> None:
        super().check_config()
        validate.check_choice(self.name, "feature_map", self.config.feature_map, tuple(FEATURE_MAPS))
        if not self.config.eps >= 0:
            raise ValueError(f"eps of method 'linear' must be >= 0, got {self.config.eps!r}")

    def state_shapes(self, q, k, v):
        b, h, dk, dv = k.shape[0], k.shape[1], k.shape[-1], v.shape[-1]
        return {"S": (b, h, dk, dv), "z": (b, h, dk) if self.config.normalize else None}

    def run(self, q, k, v, causal, scale, form, inputs):
        dtype = state_dtype(q.dtype)
        phi = FEATURE_MAPS[self.config.feature_map]
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        state = inputs.get("initial_state")
        chunk = self.config.chunk_size
        if not self.config.normalize:
            out, s = run_form(form, q, k, v, None, scale, None if state is None else state.S, causal, chunk, phi)
            return out, LinearState(S=s, z=None)
        # z rides along as one more value column (S' = [S, z]); the kernel divides
        s0 = None if state is None else torch.cat([state.S, state.z.unsqueeze(-1)], dim=-1)
        out, s = run_form(form, q, k, v, None, scale, s0, causal, chunk, phi, self.config.eps)
        return out, LinearState(S=s[..., :-1], z=s[..., -1])
