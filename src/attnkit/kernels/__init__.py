"""Execution backends for sparse patterns, and the ``backend="auto"`` choice.

Backends: ``"gather"`` (block-sparse gather kernel, any device), ``"flex"``
(FlexAttention, compiled), ``"dense"`` (SDPA with the pattern as a boolean mask; builds
Nq x Nk, short sequences only). ``"auto"`` logs (debug) why it chose what it chose.
"""

from __future__ import annotations

import logging

import torch

from .. import validate
from . import flex as _flex
from . import ranges as _ranges
from .block_sparse import block_sparse_attention, check_no_empty_rows, count_allowed_pairs, merge_partials
from .dense import masked_sdpa, sdpa
from .pattern import BlockPattern, MaskMod, and_mods, causal_mod, lists_from_block_mask

__all__ = [
    "BACKENDS",
    "BlockPattern",
    "MaskMod",
    "and_mods",
    "causal_mod",
    "choose_backend",
    "count_allowed_pairs",
    "lists_from_block_mask",
    "run_pattern",
    "sdpa",
]

log = logging.getLogger("attnkit.kernels")

BACKENDS = ("auto", "ranges", "gather", "flex", "dense")
# Up to this many (query, key) elements the dense masked SDPA beats gathering blocks.
DENSE_MAX_ELEMS = 1024 * 1024


def choose_backend(pattern: BlockPattern, q: torch.Tensor, requested: str) -> str:
    """Resolve ``requested`` (one of BACKENDS) to a concrete backend for this pattern."""
    if requested not in BACKENDS:
        validate.unknown_name("backend", requested, list(BACKENDS))
    if requested != "auto":
        return requested
    elems = pattern.q_len * pattern.kv_len
    if elems <= DENSE_MAX_ELEMS:
        log.debug("auto -> dense: Nq*Nk=%d <= %d, a masked SDPA call is fastest", elems, DENSE_MAX_ELEMS)
        return "dense"
    if q.device.type == "cuda" and _flex.available()[0]:
        log.debug("auto -> flex: CUDA device, FlexAttention compiles a fused sparse kernel")
        return "flex"
    ok, why = _ranges.supports(pattern, q)
    if ok:
        log.debug("auto -> ranges: pattern shared by all heads, fused SDPA per key range")
        return "ranges"
    log.debug("auto -> gather: ranges declined (%s); flex declined (compile cost on %s)", why, q.device.type)
    return "gather"


def run_pattern(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    scale: float,
    backend: str = "auto",
    count_pairs: bool = False,
    method: str = "?",
) -> tuple[torch.Tensor, int, str]:
    """Attention over ``pattern``. q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D).

    Returns (out (B, Hq, Nq, D), allowed pairs or -1, backend used).
    """
    chosen = choose_backend(pattern, q, backend)
    if chosen == "dense":
        out, pairs = masked_sdpa(q, k, v, pattern, scale, count_pairs=count_pairs, method=method)
    elif chosen == "ranges":
        ok, why = _ranges.supports(pattern, q)
        if not ok:
            raise ValueError(f"backend='ranges' cannot run this pattern: {why}; use 'gather' or 'auto'")
        pairs = count_allowed_pairs(pattern, q.shape[0], q.shape[1]) if count_pairs else -1
        out = _ranges.range_attention(q, k, v, pattern, scale, method=method)
    elif chosen == "gather":
        pairs = count_allowed_pairs(pattern, q.shape[0], q.shape[1]) if count_pairs else -1
        out = block_sparse_attention(q, k, v, pattern, scale, method=method)
    else:
        ok, why = _flex.available()
        if not ok:
            raise RuntimeError(f"backend='flex' is not available: {why}")
        pairs = count_allowed_pairs(pattern, q.shape[0], q.shape[1]) if count_pairs else -1
        check_no_empty_rows(pattern, method)
        out = _flex.flex_attention(q, k, v, pattern, scale)
    return out, pairs, chosen
