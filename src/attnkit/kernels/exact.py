"""The one exact attention-with-lse function: dense attention, optionally under a mask.

``attention_with_lse(q, k, v, scale, causal, mask)`` is what the ``full`` method, the
``dense`` backend, the transformers integration (decode steps, unplanned layers, masks a
sparse method cannot take) and every method's exact parts (HyperAttention's exact
blocks, a permuted method's anchors when no sparse kernel fits) call. It runs as a tiled
plan (``tiled``), so it returns the log-sum-exp and is differentiable through both
outputs; the float64 oracle of the tests is ``attnkit.reference`` (written separately,
on purpose).

Causal attention is bottom-right aligned: query i of Nq sits at key position
Nk - Nq + i. It runs as the keys before the first query (no mask) plus the square of the
last Nq keys (the kernel's own causal rule): no Nq x Nk mask is built. GQA query heads
are served by stride-0 views of their KV head (K and V are never repeated).
"""

from __future__ import annotations

from typing import Optional

import torch

from .tiled import (
    Call,
    FoldedRows,
    Geometry,
    Plan,
    RowSel,
    WindowKeys,
    additive,
    compute_dtype,
    tiled_attention,
)


def exact_plan(causal: bool, mask: Optional[torch.Tensor] = None, name: str = "exact") -> Plan:
    """The plan of exact attention (see module doc); ``mask``: bool (True = allowed) or
    additive, broadcastable to (B, Hq, Nq, Nk), combined with causality when both are given."""

    def calls(geo: Geometry, scratch):
        group, hkv, nq, nk = geo.group, geo.kv_heads, geo.q_len, geo.kv_len
        if _foldable(causal, mask, nq, group):  # one call: each KV head read once for its query heads
            yield Call(FoldedRows(hkv), WindowKeys(None, 0, 1, hkv, 0, nk), mask=mask)
            return
        for g in range(group):
            if mask is not None:
                yield Call(RowSel(None, g, group, hkv, 0, nq), WindowKeys(None, 0, 1, hkv, 0, nk),
                           mask=_head_slice(mask, g, group, geo.q_heads))
                continue
            if not causal:
                yield Call(RowSel(None, g, group, hkv, 0, nq), WindowKeys(None, 0, 1, hkv, 0, nk))
                continue
            off = nk - nq
            if off > 0:  # keys before the first query: visible to every query
                yield Call(RowSel(None, g, group, hkv, 0, nq), WindowKeys(None, 0, 1, hkv, 0, off))
            first = max(0, -off)  # with Nq > Nk the first rows see no key
            yield Call(RowSel(None, g, group, hkv, first, nq - first), WindowKeys(None, 0, 1, hkv, max(off, 0), nk - max(off, 0)),
                       causal=True)

    return Plan(name, calls)


def _foldable(causal: bool, mask: Optional[torch.Tensor], nq: int, group: int) -> bool:
    """Whether the query heads of a KV head can share one call as rows: no per-row rule
    that differs between the folded rows (causal with several queries, or a mask that
    varies per head or per query row)."""
    if group == 1 or nq == 1 and not causal and mask is None:
        return group > 1
    if causal and nq > 1:
        return False
    return mask is None or (mask.shape[1] == 1 and mask.shape[2] == 1)


def _head_slice(mask: torch.Tensor, g: int, group: int, q_heads: int) -> torch.Tensor:
    """The mask of query heads g, g + group, ... (one per KV head), or the shared mask."""
    return mask[:, g::group] if mask.shape[1] == q_heads and q_heads > 1 else mask


def prepare_mask(mask: Optional[torch.Tensor], causal: bool, q: torch.Tensor, nk: int) -> Optional[torch.Tensor]:
    """A user mask as an additive 4-D mask in the compute dtype, with causality folded in."""
    if mask is None:
        return None
    c = compute_dtype(q.dtype)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if causal:
        nq = q.shape[2]
        tri = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        mask = mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))
    if mask.dtype == torch.bool:
        return additive(mask, c)
    return mask.to(c).clamp_min(-1e30)  # -inf in an additive mask is slow on the CPU kernel


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention and its log-sum-exp.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv), Hq a multiple of Hkv.
    mask: None, or bool (True = may attend) / additive, broadcastable to (B, Hq, Nq, Nk).
    Returns out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) (float64 for float64
    inputs, else float32). A row with no allowed key: out 0, lse -inf. Differentiable.
    """
    return tiled_attention(q, k, v, exact_plan(causal, prepare_mask(mask, causal, q, k.shape[2])), scale)
