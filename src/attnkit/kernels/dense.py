"""Dense backend: the pattern as a boolean Nq x Nk mask over exact attention.

It builds the Nq x Nk mask: ``backend="auto"`` uses it for short sequences, where one
masked call is fastest, and never for long ones; forced, it runs any pattern (a check
that the sparse kernels compute the same set, in tests).
"""

from __future__ import annotations

import torch

from .exact import exact_plan
from .pattern import BlockPattern
from .tiled import Plan, additive


def dense_plan(pattern: BlockPattern, dtype: torch.dtype, name: str = "dense") -> Plan:
    """Exact attention under ``pattern.dense_mask()`` (additive, in compute ``dtype``)."""
    return exact_plan(False, additive(pattern.dense_mask(), dtype), name=name)
