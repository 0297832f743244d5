"""Checks every prefill method passes, shared by the registry-driven tests and the
recipe tests (a method added from ``docs/adding-a-method.md``).

The oracle is ``reference_attention`` (float64) over the pattern the method ran
(``stats.pattern.dense_mask``): its autograd gradients are the exact gradients of
attention over that allowed set, so every backend's out, dq, dk, dv must equal them to
rounding (float64 inputs).
"""

from __future__ import annotations

import torch

import attnkit as ak
from attnkit.reference import reference_attention

TOL = 1e-10


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to max(1, |b|_max)."""
    return (a.double() - b.double()).abs().max().item() / max(1.0, b.double().abs().max().item())


def oracle(q, k, v, mask, causal, grad_out):
    """(out, (dq, dk, dv)) of the float64 oracle over ``mask`` (None: every key)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*leaves, mask=mask, causal=causal)
    return out, torch.autograd.grad(out, leaves, grad_out.double())


def check_against_oracle(name: str, config: dict, causal: bool, q, k, v, grad_out, max_density: float = 0.7) -> torch.Tensor:
    """Forward and gradients of method ``name`` on "auto" and every backend that can train
    equal the oracle's over the pattern it selected, and that pattern is sparse.
    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), float64 with requires_grad. Returns the
    pattern's dense mask (B, Hq, Nq, Nk) (None for a method without one)."""
    b, hq, nq = q.shape[:3]
    method = ak.get(name, **config)
    backends = method.compatible_backends(q, k, v, causal, training=True)
    assert backends and "flex" not in backends  # CPU FlexAttention has no backward
    reference = None  # (mask, out, grads) of the oracle, from the first run's pattern
    for backend in ["auto"] + backends:
        out, stats = method(q, k, v, causal=causal, backend=backend, return_stats=True)
        if backend == "auto":
            assert "dense" not in stats.backend.split("+"), f"auto chose {stats.backend} at Nq*Nk = {nq * k.shape[2]}"
        else:
            assert stats.backend in (backend, f"{backend}+{backend}"), (backend, stats.backend)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        mask = None if stats.pattern is None else stats.pattern.dense_mask(b, hq)
        if reference is None:
            assert name == "full" or stats.density < max_density, f"{name}: density {stats.density:.2f} is not sparse"
            reference = (mask, *oracle(q, k, v, mask, causal, grad_out))
        elif mask is not None:
            assert torch.equal(mask, reference[0]), f"{backend}: another pattern than auto's"
        _, expected, expected_grads = reference
        assert out.dtype == torch.float64 and out.shape == (b, hq, nq, v.shape[-1])
        assert max_err(out, expected) < TOL, f"{backend} ({stats.backend}): forward"
        for which, got, want in zip("qkv", grads, expected_grads):
            assert max_err(got, want) < TOL, f"{backend} ({stats.backend}): d{which} off by {max_err(got, want):.2e}"
    return reference[0]
