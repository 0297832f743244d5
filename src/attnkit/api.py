"""The operator-level public API: ``attention``, ``get``."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .methods.base import AttentionStats, Method
from .registry import method_class


def get(name: str, **config: Any) -> Method:
    """A configured method: ``m = get("streaming", sink=4, window=1024); m(q, k, v, causal=True)``.

    Unknown names and unknown / ill-typed config fields raise with the valid choices.
    """
    return method_class(name)(**config)


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
    **config: Any,
) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
    """Attention of q over k, v with an efficient method.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq % Hkv == 0 (GQA/MQA).
    Returns (B, Hq, Nq, D) in q's dtype and device (and ``AttentionStats`` when
    ``return_stats``). ``causal`` with Nq < Nk means the queries are the last Nq
    positions (bottom-right aligned). ``scale`` defaults to 1/sqrt(D). ``backend`` is
    one of "auto", "gather", "flex", "dense" for sparse methods. ``config`` holds the
    method's config fields (see ``attnkit info METHOD``); ``check_finite=False`` skips
    the NaN/Inf scan of the inputs.
    """
    m = get(method, **config)
    return m(q, k, v, causal=causal, scale=scale, backend=backend, return_stats=return_stats, check_finite=check_finite)
