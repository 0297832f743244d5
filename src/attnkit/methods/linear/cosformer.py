"""cosFormer: ReLU linear attention with a cos-based re-weighting.

Paper: Qin, Sun, Deng, Li, Wei, Lv, Yan, Kong, Zhong, "cosFormer: Rethinking Softmax in
Attention", arXiv:2202.08791 (ICLR 2022).

o_i = sum_j relu(q_i) . relu(k_j) cos(a_i - a_j) v_j / (sum_j relu(q_i) . relu(k_j) cos(a_i - a_j) + eps),
a_i = pi/2 * i / M, positions i = 1, 2, ... (from 1, as the paper's code's ``get_index``),
j <= i when causal, every j when not. cos(a_i - a_j) = cos a_i cos a_j + sin a_i sin a_j
makes it linear attention on the 2 Dk features [relu(x) cos a, relu(x) sin a]: two
feature-space states, S_cos and S_sin (and their normalisers), carried together
(``CosformerState``).

M: ``max_len`` = 0 (default) uses the call's length N (non-causal: the paper's
M = max(source, target length) of its code; causal: the prefill's length, as the code
does in training). A state carried to a later call (decode, a split sequence) needs a
fixed M: set ``max_len`` (the causal variant with a known maximum length); continuing
from a state with ``max_len=0`` is an error, and so are positions beyond ``max_len``
(i - j > M would make the weights negative). Deviations: ``eps`` is added to the
denominator (the code clamps it at 1e-6); ``scale`` (default 1, the paper's) multiplies
relu(q). State: ``CosformerState`` (S_cos, S_sin (B, Hkv, Dk, Dv), z_cos, z_sin (B, Hkv, Dk),
seen: tokens so far).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...registry import register
from .base import LinearConfig, LinearMethod, run_normalized
from .state import CosformerState, state_dtype


def cos_sin_features(x: torch.Tensor, first: int, m: int) -> torch.Tensor:
    """x: (..., N, D) -> (..., N, 2D): [relu(x) cos a, relu(x) sin a], a = pi/2 * i / m for
    positions i = first, ..., first + N - 1."""
    pos = torch.arange(first, first + x.shape[-2], dtype=x.dtype, device=x.device)
    a = (math.pi / 2 * pos / m)[:, None]
    r = F.relu(x)
    return torch.cat([r * a.cos(), r * a.sin()], dim=-1)


@register(
    "cosformer",
    family="linear",
    paper="cosFormer: Rethinking Softmax in Attention",
    arxiv="2202.08791",
    year=2022,
    supports=("causal", "non_causal", "decode", "gqa"),
)
class CosFormer(LinearMethod):
    """ReLU linear attention re-weighted by cos(pi/2 (i - j) / M), as two feature-space states."""

    State = CosformerState
    unit_scale = True

    @dataclass
    class Config(LinearConfig):
        max_len: int = 0
        eps: float = 1e-6

    def check_config(self) -> None:
        super().check_config()
        m = self.config.max_len
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"max_len of method 'cosformer' must be an integer >= 0 (0: the call's length), got {m!r}")
        if not self.config.eps >= 0:
            raise ValueError(f"eps of method 'cosformer' must be >= 0, got {self.config.eps!r}")

    def state_shapes(self, q, k, v):
        b, h, dk, dv = k.shape[0], k.shape[1], k.shape[-1], v.shape[-1]
        return {"S_cos": (b, h, dk, dv), "S_sin": (b, h, dk, dv), "z_cos": (b, h, dk), "z_sin": (b, h, dk)}

    def check_inputs(self, q, k, v, causal, inputs, check_finite=True):
        super().check_inputs(q, k, v, causal, inputs, check_finite)
        state = inputs.get("initial_state")
        seen = 0
        if state is not None:
            if self.config.max_len == 0:
                raise ValueError("method 'cosformer' continues from a state only with a fixed M: set max_len (>= every "
                                 "position, e.g. the longest sequence you will decode)")
            seen = state.seen
            if isinstance(seen, bool) or not isinstance(seen, int) or seen < 0:
                raise ValueError(f"initial_state.seen of method 'cosformer' must be an integer >= 0, got {seen!r}")
        if self.config.max_len and seen + q.shape[2] > self.config.max_len:
            raise ValueError(f"method 'cosformer': positions up to {seen + q.shape[2]} exceed max_len="
                             f"{self.config.max_len} (the weights cos(pi/2 (i-j)/M) need i - j <= M)")

    def run(self, q, k, v, causal, scale, form, inputs):
        dtype = state_dtype(q.dtype)
        state = inputs.get("initial_state")
        seen = 0 if state is None else state.seen
        m = self.config.max_len or q.shape[2]
        fq = cos_sin_features(q.to(dtype), seen + 1, m)
        fk = cos_sin_features(k.to(dtype), seen + 1, m)
        s0 = z0 = None
        if state is not None:
            s0 = torch.cat([state.S_cos, state.S_sin], dim=-2)
            z0 = torch.cat([state.z_cos, state.z_sin], dim=-1)
        out, s, z = run_normalized(form, fq, fk, v.to(dtype), s0, z0, causal, self.config.chunk_size,
                                   self.config.eps, scale)
        dk = q.shape[-1]
        return out, CosformerState(S_cos=s[..., :dk, :], S_sin=s[..., dk:, :], z_cos=z[..., :dk], z_sin=z[..., dk:],
                                   seen=seen + q.shape[2])
