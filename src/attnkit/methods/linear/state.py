"""Recurrent states of the linear family: small typed objects that go in and out of a call.

A state holds, per batch row and state head (B, H: H the key/value head count, Hkv),
the (Dk', Dv) matrix S in the feature space of the keys, plus the normaliser z where the
method has one. dtype: float32 for float16 / bfloat16 / float32 inputs, float64 for
float64 inputs (``state_dtype``). ``out, state = ak.attention(..., return_state=True)``
returns one; ``initial_state=state`` continues from it, so attention over a sequence
split in two equals attention over the whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The state's (and the computation's) dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class KVState:
    """S: (B, H, Dk, Dv), sum over the tokens seen of (decayed) k_t v_t^T.

    The state of ``retnet``, ``lightning`` (S_t = gamma_h S_{t-1} + k_t v_t^T) and ``gla``
    (S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T)."""

    S: torch.Tensor

    def detach(self) -> "KVState":
        return type(self)(**{name: None if t is None else t.detach() for name, t in vars(self).items()})


@dataclass
class LinearState(KVState):
    """S: (B, H, Dk', Dv), sum of phi(k_t) v_t^T; z: (B, H, Dk') sum of phi(k_t), the
    normaliser (None when the method is not normalised). Dk' = the feature map's size
    (Dk for elu1 / relu / identity; 1 + Dk + Dk^2 for ``based``; 2M for ``hedgehog``).
    The state of ``linear``, ``based`` and ``hedgehog``."""

    z: Optional[torch.Tensor] = None


@dataclass
class PerformerState(LinearState):
    """``performer``: S (B, H, m, Dv) and z (B, H, m) in the random-feature space, stored
    at the scale exp(-offset) of the key features; offset: (B, H) the largest key
    log-feature seen so far (the stabiliser: S_true = exp(offset) S)."""

    offset: Optional[torch.Tensor] = None


@dataclass
class CosformerState:
    """``cosformer``: two feature-space states, one per term of
    cos(a_i - a_j) = cos a_i cos a_j + sin a_i sin a_j (a_i = pi/2 i / M):
    S_cos, S_sin: (B, H, Dk, Dv) sums of relu(k_j) cos a_j v_j^T and relu(k_j) sin a_j v_j^T;
    z_cos, z_sin: (B, H, Dk) their normalisers; seen: the number of tokens seen (the next
    token's position is seen + 1)."""

    S_cos: torch.Tensor
    S_sin: torch.Tensor
    z_cos: torch.Tensor
    z_sin: torch.Tensor
    seen: int = 0

    def detach(self) -> "CosformerState":
        return CosformerState(self.S_cos.detach(), self.S_sin.detach(), self.z_cos.detach(), self.z_sin.detach(),
                              self.seen)
