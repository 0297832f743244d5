"""Helpers shared by the KV-cache policies: observation-window attention, pooling, slot
ranks and masks, decode-time attention. The contract (``CachePolicy``, ``LayerView``) is in
``base.py``, quantization in ``quantize.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import LayerView


def window_probs(view: LayerView, last: Optional[int] = None) -> torch.Tensor:
    """Softmax attention of the observation queries over the slots, float32.

    Query at position p sees valid slots at positions <= p. ``last``: only the last
    ``last`` observation queries. Returns (B, Hq, W, L). O(W * L), never L x L.
    """
    q, qpos = view.queries, view.query_positions
    if q is None:
        raise RuntimeError("this policy needs observation queries but the cache recorded none")
    if last is not None:
        q, qpos = q[:, :, -last:], qpos[-last:]
    g = q.shape[1] // view.keys.shape[1]
    k = view.keys.repeat_interleave(g, dim=1) if g > 1 else view.keys
    logits = torch.matmul(q, k.transpose(2, 3)) * view.scale
    pos = view.positions.repeat_interleave(g, dim=1) if g > 1 else view.positions  # (B, Hq, L)
    allowed = (pos[:, :, None, :] >= 0) & (pos[:, :, None, :] <= qpos.view(1, 1, -1, 1))
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return probs.nan_to_num(0.0)  # a query with no visible slot contributes nothing


def group_mean(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, Hq, ...) -> (B, Hkv, ...): mean over the query heads of each KV head."""
    b, hq = x.shape[:2]
    return x.view(b, hkv, hq // hkv, *x.shape[2:]).mean(dim=2)


def pool1d(scores: torch.Tensor, kernel: int, kind: str) -> torch.Tensor:
    """Pool (..., L) along L with stride 1 and same length ("max", "avg" or "none").

    "avg" counts the zero padding (``F.avg_pool1d`` defaults, as SnapKV/kvpress do).
    """
    if kind == "none" or kernel <= 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1]) if scores.dim() != 3 else scores
    if kind == "avg":
        out = F.avg_pool1d(flat, kernel_size=kernel, padding=kernel // 2, stride=1)
    elif kind == "max":
        out = F.max_pool1d(flat, kernel_size=kernel, padding=kernel // 2, stride=1)
    else:
        raise ValueError(f"pooling must be 'max', 'avg' or 'none', got {kind!r}")
    return out.reshape(shape)


def ranks(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For (B, Hkv, L) valid slots: (rank of each slot among its head's valid slots in
    position order, count of valid slots per head (B, Hkv, 1))."""
    csum = valid.long().cumsum(dim=-1)
    return csum - 1, csum[..., -1:]


def recent_mask(view: LayerView, n: int) -> torch.Tensor:
    """(B, Hkv, L) bool: each head's ``n`` most recent valid slots."""
    rank, count = ranks(view.valid)
    return view.valid & (rank >= count - n)


def sink_mask(view: LayerView, n: int) -> torch.Tensor:
    """(B, Hkv, L) bool: each head's first ``n`` valid slots (attention sinks)."""
    rank, _ = ranks(view.valid)
    return view.valid & (rank < n)


def window_slots(view: LayerView) -> torch.Tensor:
    """(B, Hkv, L) bool: slots at the positions of the observation queries."""
    first = int(view.query_positions[0])
    return view.valid & (view.positions >= first)


def protect(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores with the ``mask`` slots set to +inf (always kept)."""
    return scores.masked_fill(mask, float("inf"))


# --- decode-time selection helpers (tokenselect, recycled, retrieval, infllm) -----------


def top_slots(scores: torch.Tensor, budget: int, valid: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, L) bool: per head, the ``budget`` highest-scoring valid slots, by
    ``torch.topk`` (O(L); a decode step's selection, where a full stable sort costs more
    than the attention it saves). Ties between equal finite scores at the boundary may
    fall either way (``base.topk_per_head`` breaks them towards the recent slot)."""
    k = min(budget, scores.shape[-1])
    idx = scores.masked_fill(~valid, float("-inf")).topk(k, dim=-1).indices
    return torch.zeros_like(valid).scatter_(-1, idx, True) & valid


def decode_logits(view: LayerView, q: torch.Tensor) -> torch.Tensor:
    """(B, Hq, L) float32 scaled q.k of the newest query q: (B, Hq, T, D) over the slots;
    invalid slots are -inf."""
    b, hq = q.shape[:2]
    k = view.keys
    hkv, length = k.shape[1], k.shape[2]
    qg = q[:, :, -1].to(k.dtype).reshape(b, hkv, hq // hkv, -1)  # query heads grouped by KV head: no copy of K
    logits = torch.matmul(qg, k.transpose(2, 3)).float() * view.scale  # (B, Hkv, G, L)
    logits = logits.masked_fill(~view.valid[:, :, None, :], float("-inf"))
    return logits.reshape(b, hq, length)


def decode_probs(view: LayerView, q: torch.Tensor) -> torch.Tensor:
    """(B, Hq, L) float32 softmax attention of the newest query over the valid slots."""
    return torch.softmax(decode_logits(view, q), dim=-1).nan_to_num(0.0)


def mask_state(view: LayerView, name: str) -> Optional[torch.Tensor]:
    """A per-slot 0/1 policy state as (B, Hkv, L) bool (None if absent)."""
    s = view.state.get(name)
    return None if s is None else s > 0.5
