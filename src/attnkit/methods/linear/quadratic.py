"""The call contract of the linear family's quadratic, softmax-free methods (``sigmoid``,
``agent``): no recurrent state (``return_state`` is an error) and no softmax normaliser
over the keys (``return_lse`` is an error); Nq may differ from Nk (bottom-right aligned
when causal, as every softmax method). A subclass implements ``run``.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch

from ..base import AttentionStats, Method


class QuadraticMethod(Method):
    """A method that attends over its keys at every call, with its own kernel."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                 scale: Optional[float] = None, backend: str = "auto", return_stats: bool = False,
                 check_finite: bool = True, return_lse: bool = False, return_state: bool = False):
        """q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv)
        (then stats with ``return_stats``)."""
        if return_lse:
            raise ValueError(f"return_lse=True: method {self.name!r} has no softmax normaliser over the keys "
                             f"(log-sum-exp) to return, so its partial results are not merged by log-sum-exp")
        if return_state:
            raise ValueError(f"return_state=True: method {self.name!r} has no recurrent state (it attends over all its "
                             f"keys at every call); pass earlier tokens as keys (Nq < Nk) instead")
        self._check_call(q, k, v, causal, scale, check_finite)
        if backend != "auto":
            raise ValueError(f"method {self.name!r} runs its own kernel, not a pattern: backend must be 'auto', "
                             f"got {backend!r}")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        start = time.perf_counter()
        out, density = self.run(q, k, v, causal, scale)
        stats = AttentionStats(self.name, density, None, 0.0, self.name, time.perf_counter() - start)
        return (out, stats) if return_stats else out

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            scale: float) -> tuple[torch.Tensor, float]:
        """(out (B, Hq, Nq, Dv) in q's dtype, density of the pairs used). Inputs are checked."""
        raise NotImplementedError

    def patterns(self, q, k, causal, scale):
        return []

    def compatible_backends(self, q, k, v, causal=False, scale=None, training=False, return_lse=False):
        return [] if return_lse else ["auto"]
