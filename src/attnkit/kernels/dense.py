"""Dense backends: plain SDPA (exact attention) and SDPA with the pattern as a boolean mask.

The masked variant builds the Nq x Nk mask: it is what ``backend="auto"`` uses for short
sequences, where it is the fastest choice, and never for long ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import validate
from .pattern import BlockPattern


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """Exact attention. q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) -> (B, Hq, Nq, D).

    Causal is bottom-right aligned (the queries are the last Nq positions).
    """
    nq, nk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if causal and nq != nk:
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(diagonal=nk - nq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)


def masked_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, scale: float, count_pairs: bool = False, method: str = "?"
) -> tuple[torch.Tensor, int]:
    """SDPA over the pattern's dense mask. Same contract as ``block_sparse_attention``."""
    b, hq = q.shape[:2]
    mask = pattern.dense_mask()
    empty = ~mask.any(dim=-1)
    if bool(empty.any()):
        bb, hh, ii = (int(x) for x in empty.nonzero()[0])
        validate.empty_row_error(ii, bb, hh, method)
    pairs = int(mask.sum().item()) * (b // mask.shape[0]) * (hq // mask.shape[1]) if count_pairs else -1
    gqa = hq != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out, pairs
