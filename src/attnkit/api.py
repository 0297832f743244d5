"""The operator-level public API: ``attention``, ``get``."""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import methods as _builtin  # noqa: F401  (importing the package registers the built-in methods)
from .methods.base import Method
from .registry import method_class


def get(name: str, **config: Any) -> Method:
    """A configured method: ``m = get("streaming", sink=4, window=1024); m(q, k, v, causal=True)``.

    Unknown names and unknown / ill-typed config fields raise with the valid choices.
    """
    return method_class(name)(**config)


def _split_inputs(name: str, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config fields, per-call inputs) of the keywords given for method ``name``: an input
    is a name the method class declares in ``inputs`` (linear family: g, beta, initial_state)."""
    declared = method_class(name).inputs
    inputs = {key: value for key, value in config.items() if key in declared}
    return {key: value for key, value in config.items() if key not in declared}, inputs


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str = "full",
    causal: bool = False,
    scale: Optional[float] = None,
    backend: str = "auto",
    return_stats: bool = False,
    check_finite: bool = True,
    return_lse: bool = False,
    return_state: bool = False,
    **config: Any,
) -> torch.Tensor | tuple:
    """Attention of q over k, v with an efficient method.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) (v may have its own head size Dv) with
    Hq % Hkv == 0 (GQA/MQA). Returns out (B, Hq, Nq, Dv) in q's dtype and device; then,
    in this order, lse (B, Hq, Nq) when ``return_lse`` (natural log of each row's softmax
    normaliser over the method's allowed keys; float64 for float64 inputs, else float32;
    -inf and out 0 on a row with no key), the recurrent state when ``return_state`` (linear
    methods only; they refuse ``return_lse``) and ``AttentionStats`` when ``return_stats``.
    ``causal`` with Nq < Nk means the queries are the last Nq positions (bottom-right
    aligned). ``scale`` defaults to 1/sqrt(D). ``backend``: "auto" or one of
    ``attnkit.kernels.BACKENDS`` (a backend that cannot run the call is an error listing
    the compatible ones; ``ak.get(method).compatible_backends(q, k, v, causal)``).
    ``config`` holds the method's config fields (see ``attnkit info METHOD``) and, for a
    linear method, its per-call inputs (``g``, ``beta``, ``initial_state``: docs/linear.md);
    ``check_finite=False`` skips the NaN/Inf scan of the inputs. Differentiable in q, k
    and v (out and lse) over the pattern the method selected.
    """
    config, inputs = _split_inputs(method, config)
    m = get(method, **config)
    extra = {"return_state": True} if return_state else {}
    return m(q, k, v, causal=causal, scale=scale, backend=backend, return_stats=return_stats, check_finite=check_finite,
             return_lse=return_lse, **extra, **inputs)
