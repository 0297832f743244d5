"""Performer: FAVOR+ positive orthogonal random features.

Paper: Choromanski, Likhosherstov, Dohan, Song, Gane, Sarlos, Hawkins, Davis, Mohiuddin,
Kaiser, Belanger, Colwell, Weller, "Rethinking Attention with Performers",
arXiv:2009.14794 (ICLR 2021).

phi(x) = exp(w_r . x' - |x'|^2 / 2) / sqrt(m), r = 1..m, x' = x scale^(1/2), so that
E[phi(q) . phi(k)] = exp(scale q . k) (the softmax kernel), and
o_i = phi(q_i)^T S_i / phi(q_i)^T z_i as in ``linear`` (S, z over j <= i when causal, over
every j when not). W (m, Dk): orthogonal random features as in the paper's code
(``create_projection_matrix``): blocks of Dk rows, each the orthogonal factor of the QR of
a Gaussian (Dk, Dk) matrix, the last block cut to m rows, then row r rescaled by the norm
of a fresh Gaussian Dk-vector (so the row norms are chi-distributed like Gaussian rows).
Drawn once per (m, Dk, seed) by ``projection`` (a function the tests call), shared by all
heads; ``seed`` redraws it (the paper's periodic redraw is a new seed).

Numerical stability, as the paper's code subtracts a max before exp (its queries: the
max over the m features; its keys: one max over every key and feature): a query's
log-features minus their max over the m features (a per-query factor that cancels in
the normalised output). Non-causal, the keys' minus their max over the call's keys and
features (and the state's offset). Causal, key t minus c_t, the running max of the key
log-features up to t (the largest one query t can see): the state is kept at scale
exp(-c_t) by the shared kernel's per-head log-decay g_t = c_{t-1} - c_t <= 0, so every
form rescales exactly, and an early query is not underflowed by a later large key (as a
whole-sequence max would do). The state carries the offset (``PerformerState.offset``),
so a sequence split in two equals one shot. Deviations: the code adds a small constant
(1e-6 / 1e-4) to every feature; here none is added (exp(.) > 0) and the denominator gets
only a floor (the dtype's smallest normal number), which keeps the output invariant to
the shifts. A query whose own features on the visible keys' directions lie ~87 below its
max (float32) still underflows: q . k / sqrt(D) in the hundreds.
``scale`` defaults to 1/sqrt(Dk), the softmax scale the features approximate. Causal via
the shared chunked kernel (no decay), non-causal too.
State: ``PerformerState`` (S (B, Hkv, m, Dv), z (B, Hkv, m), offset (B, Hkv)).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ... import validate
from ...registry import register
from .base import LinearConfig, LinearMethod, run_normalized
from .state import PerformerState, state_dtype


@functools.lru_cache(maxsize=32)
def _projection64(m: int, d: int, seed: int, orthogonal: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if orthogonal:
        blocks = []
        for _ in range(-(-m // d)):
            qmat, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
            blocks.append(qmat.t())
        w = torch.cat(blocks)[:m]
        norms = torch.randn(m, d, generator=gen, dtype=torch.float64).norm(dim=1)
        return norms[:, None] * w
    return torch.randn(m, d, generator=gen, dtype=torch.float64)


def projection(m: int, d: int, seed: int = 0, orthogonal: bool = True, dtype=torch.float64,
               device=None) -> torch.Tensor:
    """The random feature matrix W: (m, d), seeded (the same for a given m, d, seed)."""
    return _projection64(m, d, seed, orthogonal).to(dtype=dtype, device=device)


def log_features(x: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """x: (..., N, D) -> (..., N, m): w . x' - |x'|^2 / 2, x' = x scale^(1/2)."""
    xs = x * scale**0.5
    return xs @ w.t() - 0.5 * (xs * xs).sum(-1, keepdim=True)


@register(
    "performer",
    family="linear",
    paper="Rethinking Attention with Performers",
    arxiv="2009.14794",
    year=2020,
    supports=("causal", "non_causal", "decode", "gqa"),
)
class Performer(LinearMethod):
    """FAVOR+: linear attention on positive orthogonal random features of the softmax kernel."""

    State = PerformerState

    @dataclass
    class Config(LinearConfig):
        features: int = 256
        seed: int = 0
        orthogonal: bool = True

    def check_config(self) -> None:
        super().check_config()
        validate.check_positive(self.name, features=self.config.features)
        if isinstance(self.config.seed, bool) or not isinstance(self.config.seed, int) or self.config.seed < 0:
            raise ValueError(f"seed of method 'performer' must be an integer >= 0, got {self.config.seed!r}")
        if not isinstance(self.config.orthogonal, bool):
            raise ValueError(f"orthogonal of method 'performer' must be a bool, got {self.config.orthogonal!r}")

    def state_shapes(self, q, k, v):
        b, h, m, dv = k.shape[0], k.shape[1], self.config.features, v.shape[-1]
        return {"S": (b, h, m, dv), "z": (b, h, m), "offset": (b, h)}

    def run(self, q, k, v, causal, scale, form, inputs):
        dtype = state_dtype(q.dtype)
        c = self.config
        w = projection(c.features, q.shape[-1], c.seed, c.orthogonal, dtype, q.device)
        lq = log_features(q.to(dtype), w, scale)
        lk = log_features(k.to(dtype), w, scale)
        norm = c.features ** -0.5
        fq = (lq - lq.amax(-1, keepdim=True).detach()).exp() * norm
        state = inputs.get("initial_state")
        if causal:
            return self._causal(form, fq, lk, v.to(dtype), state, norm)
        offset = lk.detach().amax(dim=(-1, -2))  # (B, H): one shift for every key (all are visible)
        s0 = z0 = None
        if state is not None:
            offset = torch.maximum(offset, state.offset)
            shrink = (state.offset - offset).exp()
            s0, z0 = state.S * shrink[..., None, None], state.z * shrink[..., None]
        fk = (lk - offset[..., None, None]).exp() * norm
        out, s, z = run_normalized(form, fq, fk, v.to(dtype), s0, z0, False, c.chunk_size, torch.finfo(fq.dtype).tiny)
        return out, PerformerState(S=s, z=z, offset=offset)

    def _causal(self, form, fq, lk, v, state, norm):
        """Key t shifted by c_t, the running max of the key log-features up to t (the keys
        query t sees); the state kept at scale exp(-c_t) by the per-head log-decay
        g_t = c_{t-1} - c_t <= 0 of the shared kernel, so every form rescales exactly."""
        kmax = lk.detach().amax(-1)  # (B, H, N)
        first = kmax[..., :1] if state is None else state.offset.detach().unsqueeze(-1)
        c = torch.cat([first, kmax], dim=-1).cummax(dim=-1).values  # c_0 = the state's offset
        g = c[..., :-1] - c[..., 1:]
        fk = (lk - c[..., 1:, None]).exp() * norm
        s0, z0 = (None, None) if state is None else (state.S, state.z)
        out, s, z = run_normalized(form, fq, fk, v, s0, z0, True, self.config.chunk_size, torch.finfo(fq.dtype).tiny,
                                   g=g)
        return out, PerformerState(S=s, z=z, offset=c[..., -1])
