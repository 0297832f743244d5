"""Deterministic per-call inputs (``g``, ``beta``) for linear methods in the benchmarks.

A linear method declares its per-call tensors in ``inputs`` (``gla``: g; ``delta``: beta;
``gated_delta``, ``kda``: g and beta). ``attnkit speed`` and the fidelity task have no
model layer to compute them, so they draw them from a seeded generator, in the shape the
method wants:

- g: log-space decay ``logsigmoid(x)``, x ~ N(0, 1), one per head (B, H, N) for
  ``gated_delta`` (``decay = "head"``) or one per key channel (B, H, N, Dk) for ``gla`` and
  ``kda``; for ``gla`` divided by 16, the gate normaliser of the GLA layer
  (``gate_logit_normalizer``), so its chunks take the usual (bounded-span) path;
- beta: ``sigmoid(x)``, x ~ N(0, 1), (B, H, N);

H is the state heads: the value heads for the delta-rule methods (``grouping = "value"``),
else the key/value heads. ``initial_state`` is never generated (None).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

GLA_GATE_NORMALIZER = 16.0


def method_inputs(method: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """The generated per-call tensors ``method`` needs for q, k, v (empty when it needs none)."""
    wanted = [name for name in getattr(method, "inputs", ()) if name != "initial_state"]
    if not wanted:
        return {}
    gen = torch.Generator().manual_seed(seed)
    heads = v.shape[1] if getattr(method, "grouping", "gqa") == "value" else k.shape[1]
    b, n, dk = k.shape[0], k.shape[2], k.shape[-1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out: dict[str, torch.Tensor] = {}
    if "g" in wanted:
        per_head = getattr(method, "decay", "channel") == "head"
        shape = (b, heads, n) if per_head else (b, heads, n, dk)
        g = F.logsigmoid(torch.randn(shape, generator=gen, dtype=dtype))
        if method.name == "gla":
            g = g / GLA_GATE_NORMALIZER
        out["g"] = g.to(q.device)
    if "beta" in wanted:
        out["beta"] = torch.sigmoid(torch.randn((b, heads, n), generator=gen, dtype=dtype)).to(q.device)
    unknown = set(wanted) - set(out)
    if unknown:
        raise ValueError(f"method {method.name!r} needs inputs {sorted(unknown)} that the benchmark cannot generate")
    return out


def describe_inputs(method: Any) -> str:
    """One line: what ``method_inputs`` generates for ``method`` ("-" when nothing)."""
    wanted = [name for name in getattr(method, "inputs", ()) if name != "initial_state"]
    heads = "Hv" if getattr(method, "grouping", "gqa") == "value" else "Hkv"
    parts = []
    if "g" in wanted:
        per_head = getattr(method, "decay", "channel") == "head"
        shape = f"(B, {heads}, N)" if per_head else f"(B, {heads}, N, Dk)"
        norm = f" / {GLA_GATE_NORMALIZER:g}" if method.name == "gla" else ""
        parts.append(f"g {shape} = logsigmoid(randn){norm}")
    if "beta" in wanted:
        parts.append(f"beta (B, {heads}, N) = sigmoid(randn)")
    return "; ".join(parts) or "-"
