"""Range kernel: a shared (same for every batch and head) pattern run as a few fused
SDPA calls per query block, merged by log-sum-exp.

Consecutive listed key blocks of a query block are merged into contiguous key ranges.
A range whose tiles are all full runs unmasked; a range holding a partial tile runs
with the pattern's element rule as an additive mask of that range only. Each call uses
the CPU flash-attention kernel, which returns the log-sum-exp, so the partial results
merge exactly (as FlashAttention merges its tiles). K/V are sliced, never gathered; GQA
query heads are folded into the rows of one call, so K/V are never repeated.

This is the fast path on the CPU for position-only patterns (windows, sinks, bands):
a handful of large matmuls per block instead of many small ones.
"""

from __future__ import annotations

import torch

from .. import validate
from .block_sparse import merge_partials
from .cpu_flash import flash_with_lse
from .pattern import BlockPattern, cdiv

# A finite "minus infinity": -inf in the additive mask sends the CPU kernel down a slow path.
_MASKED = -1e30


def supports(pattern: BlockPattern, q: torch.Tensor) -> tuple[bool, str]:
    """Whether this kernel can run the pattern on q, and why not."""
    if pattern.kv_blocks.shape[0] != 1 or pattern.kv_blocks.shape[1] != 1:
        return False, "pattern differs per batch/head"
    if q.device.type != "cpu":
        return False, "CPU flash kernel only"
    if q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return False, f"dtype {q.dtype}"
    return True, ""


def key_ranges(pattern: BlockPattern, q_block: int) -> list[tuple[int, int, bool]]:
    """Contiguous key ranges [start, end) of one query block, with ``full`` flags."""
    lists = pattern.kv_blocks[0, 0, q_block]
    count = int((lists >= 0).sum())
    blocks = lists[:count].tolist()
    if pattern.full_tiles is not None:
        full = pattern.full_tiles[0, 0, q_block, :count].tolist()
    else:
        full = [False] * count
    bk, nk = pattern.block_k, pattern.kv_len
    ranges: list[list] = []
    for block, is_full in zip(blocks, full):
        start, end = block * bk, min(nk, (block + 1) * bk)
        is_full = bool(is_full) and end - start == bk
        if ranges and ranges[-1][1] == start and ranges[-1][2] == is_full:
            ranges[-1][1] = end
        else:
            ranges.append([start, end, is_full])
    return [(s, e, f) for s, e, f in ranges]


def range_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, scale: float, method: str = "?",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a shared pattern. q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) -> (B, Hq, Nq, D).

    ``return_lse``: also return the log-sum-exp of each row's scaled scores, (B, Hq, Nq)
    float32; rows without keys then get out 0 and lse -inf instead of an error (as
    ``block_sparse_attention(..., return_lse=True)``, for ``merge_partials``).
    """
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    compute = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    qg = q.view(b, hkv, group, nq, d)
    out = torch.empty(b, hkv, group, nq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((b, hkv, group, nq), float("-inf"), dtype=torch.float32, device=q.device) if return_lse else None
    bq = pattern.block_q
    for qb in range(cdiv(nq, bq)):
        q0, q1 = qb * bq, min(nq, (qb + 1) * bq)
        rows = qg[:, :, :, q0:q1].reshape(b, hkv, group * (q1 - q0), d).to(compute)
        parts = [
            _part(rows, k, v, pattern, q0, q1, group, start, end, full, scale, compute)
            for start, end, full in key_ranges(pattern, qb)
        ]
        merged, total = _merge(parts)
        if lse is not None:
            if merged is None:
                out[:, :, :, q0:q1] = 0
                continue
            merged = merged.nan_to_num(nan=0.0)
            lse[:, :, :, q0:q1] = total.view(b, hkv, group, q1 - q0)
        elif merged is None or bool(torch.isnan(merged[..., 0]).any()):
            _raise_empty(merged, q0, q1, group, method)
        out[:, :, :, q0:q1] = merged.view(b, hkv, group, q1 - q0, -1).to(q.dtype)
    if lse is None:
        return out.view(b, hq, nq, -1)
    return out.view(b, hq, nq, -1), lse.view(b, hq, nq)


def _part(rows, k, v, pattern, q0, q1, group, start, end, full, scale, compute):
    keys = k[:, :, start:end].to(compute)
    values = v[:, :, start:end].to(compute)
    mask = None
    if not full and pattern.mask_mod is not None:
        q_pos = torch.arange(q0, q1, device=rows.device) + pattern.q_offset
        k_pos = torch.arange(start, end, device=rows.device)
        zero = torch.zeros((), dtype=torch.long, device=rows.device)
        allowed = pattern.mask_mod(zero, zero, q_pos[:, None], k_pos[None, :])
        allowed = allowed.expand(q1 - q0, end - start).repeat(group, 1)
        if bool(allowed.all()):
            mask = None
        else:
            mask = torch.zeros((1, 1) + tuple(allowed.shape), dtype=compute, device=rows.device)
            mask.masked_fill_(~allowed.view(mask.shape), _MASKED)
    out, lse = flash_with_lse(rows, keys, values, False, scale, attn_mask=mask)
    return out, lse


def _merge(parts):
    """Merge (out, lse) pairs of disjoint key ranges -> (out, lse), or (None, None) for no part.

    A range whose rows saw only masked keys (lse ~ -1e30) counts as empty; rows with no
    allowed key in any range come out NaN with lse -inf (the caller reports them).
    """
    if not parts:
        return None, None
    return merge_partials([(out, lse.masked_fill(lse < _MASKED / 2, float("-inf"))) for out, lse in parts])


def _raise_empty(merged, q0: int, q1: int, group: int, method: str) -> None:
    if merged is None:
        validate.empty_row_error(q0, 0, 0, method)
    bb, hh, rr = (int(x) for x in torch.isnan(merged[..., 0]).nonzero()[0])
    n = q1 - q0
    validate.empty_row_error(q0 + rr % n, bb, hh * group + rr // n, method)
