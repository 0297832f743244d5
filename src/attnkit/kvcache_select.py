"""Decode attention over the slots a query-aware policy selected (Quest, TokenSelect,
Recycled, InfLLM, RetrievalAttention): the selected keys and values are gathered into a
compact (B, Hkv, m, D) block, m the largest count selected by any head, and the decode
query attends to that block only: O(m D) per step after the selection, not O(L D)
over a mask of the whole cache."""

from __future__ import annotations

import torch


def mask_to_index(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L) bool -> (index (B, H, m) long, in slot order, 0 where padded; present
    (B, H, m) bool), m = the largest count of any (row, head), at least 1. O(L): a
    cumulative count places each chosen slot (no sort)."""
    b, h, length = chosen.shape
    counts = chosen.sum(dim=-1)
    m = max(1, int(counts.max()))
    rank = chosen.long().cumsum(dim=-1) - 1  # the place of each chosen slot in its head's list
    target = torch.where(chosen, rank, torch.full_like(rank, m))  # the others go to a dump column
    slots = torch.arange(length, device=chosen.device).expand(b, h, length)
    index = torch.zeros(b, h, m + 1, dtype=torch.long, device=chosen.device).scatter_(-1, target, slots)[..., :m]
    present = torch.arange(m, device=chosen.device) < counts[..., None]
    return index, present


def attend_selected(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chosen: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Decode attention of q: (B, Hq, 1, D) over the chosen slots (B, Hkv, L) of keys
    (B, Hkv, L, D) / values (B, Hkv, L, Dv) -> (B, Hq, 1, Dv). Query head i reads KV head
    i // G. A head with no chosen slot (a padding row) attends uniformly to nothing
    useful, as the masked path did; its output is never read."""
    b, hq, t, d = q.shape
    hkv = keys.shape[1]
    index, present = mask_to_index(chosen)
    ks = torch.gather(keys, 2, index[..., None].expand(-1, -1, -1, d))
    vs = torch.gather(values, 2, index[..., None].expand(-1, -1, -1, values.shape[-1]))
    qg = q.reshape(b, hkv, (hq // hkv) * t, d)
    logits = (qg @ ks.transpose(-1, -2)).to(torch.promote_types(ks.dtype, torch.float32)) * scale  # (B, Hkv, G, m)
    logits = logits.masked_fill(~present[:, :, None, :], float("-inf"))
    logits = torch.where(present.any(-1)[:, :, None, None], logits, torch.zeros_like(logits))
    out = logits.softmax(dim=-1).to(vs.dtype) @ vs
    return out.reshape(b, hq, t, -1)
