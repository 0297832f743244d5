"""Gather kernel: any block pattern (per batch and head), on any device.

For each chunk of query blocks the listed key blocks are gathered into one dense key
tile per block (padding slots and keys past Nk masked) and the pattern's element rule
becomes an additive mask of that tile (skipped on tiles the pattern marks full); each
chunk is one fused call with the query blocks as a batch dimension, and chunks of key
slots are merged by log-sum-exp (``tiled``). Memory per call is bounded by
``budget_elems``; no Nq x Nk tensor is built.

GQA: when the pattern is the same for all heads the key blocks are gathered once per KV
head and shared by its query heads (never repeated).

Also here: ``count_allowed_pairs`` and ``check_no_empty_rows``, which walk a pattern's
allowed pairs in bounded chunks (stats and the FlexAttention backend's row check).
"""

from __future__ import annotations

import torch

from .. import validate
from .pattern import BlockPattern
from .tiled import Call, GatheredKeys, Geometry, Plan, RowSel, additive

DEFAULT_BUDGET_ELEMS = 1 << 22  # floats per call for the gathered K/V and the mask (16 MiB fp32: recycled by malloc, never mapped anew)


def gather_plan(pattern: BlockPattern, dtype: torch.dtype, budget_elems: int = DEFAULT_BUDGET_ELEMS, name: str = "gather") -> Plan:
    """The plan of ``pattern`` on the gather kernel (masks in compute ``dtype``).

    Per chunk of query blocks, the listed tiles the pattern marks full run as one call
    whose mask (if any) only hides padding slots, shared by the rows; the other tiles as a
    second call with the element rule as the mask. Both serve the same rows (one merge)."""
    bq, bk = pattern.block_q, pattern.block_k
    nqb, nkb = pattern.num_q_blocks, pattern.num_kv_blocks
    lists = pattern.kv_blocks
    bp_n, hp_n, _, slots = lists.shape
    device = lists.device
    needs_rule = _needs_rule(pattern)  # (Bp|1, Hp, nQB, K) tiles that need the element rule

    def calls(geo: Geometry, scratch):
        group, hkv = geo.group, geo.kv_heads
        mask_heads = 1 if pattern.position_only and hp_n == 1 else hkv
        per_slot = bk * (2 * hkv * geo.head_size + mask_heads * bq)  # gathered K, V and mask of one slot
        slot_chunk = max(1, min(slots, budget_elems // max(1, per_slot)))
        q_chunk = max(1, min(nqb, budget_elems // max(1, slot_chunk * per_slot)))
        for b in range(geo.batch):
            bp = b if bp_n > 1 else 0
            for q0 in range(0, nqb, q_chunk):
                q1 = min(nqb, q0 + q_chunk)
                q_pos = ((torch.arange(q0, q1, device=device) * bq)[:, None] + torch.arange(bq, device=device)) + pattern.q_offset
                for s0 in range(0, slots, slot_chunk):
                    idx = lists[bp, :, q0:q1, s0 : s0 + slot_chunk]  # (Hp, c, ns)
                    rule = needs_rule[bp if needs_rule.shape[0] > 1 else 0, :, q0:q1, s0 : s0 + slot_chunk]
                    parts = [_compact(idx, (idx >= 0) & ~rule), _compact(idx, (idx >= 0) & rule)]
                    parts = [(part, checked) for part, checked in zip(parts, (False, True)) if part is not None]
                    for g in range(group):
                        rows = RowSel(b, g, group, hkv, q0 * bq, bq, q1 - q0, heads_first=True)
                        sel = slice(None) if hp_n == 1 else slice(g, None, group)  # lists of this call's heads
                        heads = (torch.arange(hkv, device=device) * group + g)[:mask_heads]
                        for part, checked in parts:
                            k_pos = (part.clamp(min=0) * bk).unsqueeze(-1) + torch.arange(bk, device=device)  # (Hp, c, n, Bk)
                            ok = ((part >= 0).unsqueeze(-1) & (k_pos < pattern.kv_len)).flatten(-2)  # (Hp, c, S)
                            k_pos = k_pos.flatten(-2)
                            keys = GatheredKeys(b, 0, 1, hkv, k_pos[0] if hp_n == 1 else k_pos[sel], heads_first=True,
                                                scratch=scratch if hp_n > 1 else None)
                            mask = _tile_mask(pattern, b, heads, q_pos, k_pos[sel], ok[sel], checked, dtype)
                            yield Call(rows, keys, mask=mask)

    return Plan(name, calls, q_pad=nqb * bq - pattern.q_len, k_back=nkb * bk - pattern.kv_len)


def _needs_rule(pattern: BlockPattern) -> torch.Tensor:
    """(Bp, Hp, nQB, K) bool: listed tiles whose pairs need the element rule: all unless
    the pattern marks them full; a tile running past Nk always (its padded keys)."""
    lists = pattern.kv_blocks
    needs = torch.ones_like(lists, dtype=torch.bool) if pattern.full_tiles is None else ~pattern.full_tiles
    if pattern.mask_mod is None:
        needs = torch.zeros_like(needs)
    if pattern.kv_len % pattern.block_k:
        needs = needs | (lists == pattern.num_kv_blocks - 1)
    return needs


def _compact(idx: torch.Tensor, keep: torch.Tensor):
    """(..., n) block lists -> the kept entries moved to the front in order, -1 padded, as
    narrow as the fullest row; None when nothing is kept."""
    count = keep.sum(-1)
    width = int(count.max()) if count.numel() else 0
    if width == 0:
        return None
    n = idx.shape[-1]
    order = torch.where(keep, torch.arange(n, device=idx.device), n + torch.arange(n, device=idx.device)).argsort(-1)[..., :width]
    taken = idx.gather(-1, order)
    return torch.where(torch.arange(width, device=idx.device) < count.unsqueeze(-1), taken, -1)


def _tile_mask(pattern, b, heads, q_pos, k_pos, ok, checked, dtype):
    """Additive mask (H'|1, c, Bq|1, S) of one gathered tile, or None when every pair is
    allowed: the slots' validity (padding, keys past Nk) and, when ``checked``, the rule.

    heads: (H',) query heads the rule is evaluated for (1 entry for a head-shared pattern);
    q_pos: (c, Bq) absolute query positions; k_pos, ok: (H'|1, c, S) key positions and
    slot validity."""
    allowed = ok.unsqueeze(-2)  # (H'|1, c, 1, S)
    if checked and pattern.mask_mod is not None:
        bb = torch.full((), b, dtype=torch.long, device=q_pos.device)
        hh = heads.view(-1, 1, 1, 1)
        allowed = allowed & pattern.mask_mod(bb, hh, q_pos.unsqueeze(0).unsqueeze(-1), k_pos.unsqueeze(-2))
    if bool(allowed.all()):
        return None
    return additive(allowed, dtype)


def _allowed(
    pattern: BlockPattern, idx: torch.Tensor, q_pos: torch.Tensor, mod_batch: torch.Tensor, mod_head: torch.Tensor
) -> torch.Tensor:
    """Allowed pairs of a gathered tile.

    idx: (B, H, c, slots) block lists (-1 = padding); q_pos: (1, 1, c, rows, 1) absolute
    query positions. Returns bool (B, H, c, rows, slots * block_k).
    """
    bk = pattern.block_k
    key_in_block = torch.arange(bk, device=idx.device)
    k_pos = (idx.clamp(min=0).unsqueeze(-1) * bk + key_in_block).flatten(3, 4).unsqueeze(3)
    listed = (idx >= 0).unsqueeze(-1).expand(*idx.shape, bk).flatten(3, 4).unsqueeze(3)
    allowed = listed & (k_pos < pattern.kv_len)
    if pattern.mask_mod is not None:
        allowed = allowed & pattern.mask_mod(mod_batch, mod_head, q_pos, k_pos)
    return allowed


def _allowed_chunks(pattern: BlockPattern, budget_elems: int):
    """Yield (q0, allowed (Bp, Hp, c, Bq, keys), valid query rows (1, 1, c, Bq, 1)) over query-block chunks."""
    lists = pattern.kv_blocks
    bp, hp, nqb, slots = lists.shape
    device = lists.device
    bq = pattern.block_q
    mod_batch = torch.arange(bp, device=device).view(bp, 1, 1, 1, 1)
    mod_head = torch.arange(hp, device=device).view(1, hp, 1, 1, 1)
    chunk = max(1, budget_elems // max(1, bp * hp * bq * slots * pattern.block_k))
    for q0 in range(0, nqb, chunk):
        q1 = min(nqb, q0 + chunk)
        q_pos = (torch.arange(q0, q1, device=device).view(-1, 1) * bq + torch.arange(bq, device=device)).view(1, 1, q1 - q0, bq, 1)
        yield q0, _allowed(pattern, lists[:, :, q0:q1], q_pos + pattern.q_offset, mod_batch, mod_head), q_pos < pattern.q_len


def count_allowed_pairs(pattern: BlockPattern, batch: int, heads: int, budget_elems: int = DEFAULT_BUDGET_ELEMS) -> int:
    """Number of allowed (query, key) pairs over (batch, heads), without an Nq x Nk tensor."""
    bp, hp = pattern.kv_blocks.shape[:2]
    total = sum(int((allowed & valid).sum().item()) for _, allowed, valid in _allowed_chunks(pattern, budget_elems))
    return total * (batch // bp) * (heads // hp)


def check_no_empty_rows(pattern: BlockPattern, method: str = "?", budget_elems: int = DEFAULT_BUDGET_ELEMS) -> None:
    """Raise the empty-row ValueError if some query row of the pattern has no allowed key."""
    for q0, allowed, valid in _allowed_chunks(pattern, budget_elems):
        empty = ~allowed.any(dim=-1, keepdim=True) & valid
        if bool(empty.any()):
            bb, hh, cc, rr, _ = (int(x) for x in empty.nonzero()[0])
            validate.empty_row_error((q0 + cc) * pattern.block_q + rr, bb, hh, method)
