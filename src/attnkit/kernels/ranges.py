"""Range kernel: a block pattern run as a few fused calls over contiguous key ranges.

Consecutive listed key blocks of a query block merge into contiguous key ranges; a range
whose tiles are all full runs unmasked, a range holding a partial tile runs with the
pattern's element rule as an additive mask of that range (or as the fused kernel's own
causal rule when the rule is exactly the tile's diagonal triangle). K/V are sliced,
never gathered; GQA query heads are served by their KV head's slice.

Fewer, larger calls: consecutive query blocks whose ranges have the same lengths and
flags and whose starts move by a constant step (0 for the sink columns, one block for a
sliding window) form a *run*, and each range of a run is one fused call with the blocks
as the batch dimension (keys as a strided, overlapping view; the mask shared when it is
the same for every block). A sliding window at 16k is a handful of calls, not hundreds.

The pattern may be shared by all batches and heads (the fast case: every KV head's query
heads in one call) or differ per (batch, head) (run head by head). The element rule of a
shared pattern must not depend on the batch or head (it is evaluated at b = h = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .pattern import BlockPattern, cdiv
from .tiled import Call, Geometry, Plan, RowSel, WindowKeys, additive


def key_ranges(pattern: BlockPattern, q_block: int, bp: int = 0, hp: int = 0) -> list[tuple[int, int, bool]]:
    """Contiguous key ranges [start, end) of one query block, with ``full`` flags."""
    lists = pattern.kv_blocks[bp, hp, q_block]
    count = int((lists >= 0).sum())
    blocks = lists[:count].tolist()
    if pattern.full_tiles is not None:
        full = pattern.full_tiles[bp, hp, q_block, :count].tolist()
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


@dataclass
class _Range:
    """One range of a run: block i of the run reads keys [start + i * step, ... + length)."""

    start: int
    length: int
    step: int
    full: bool


@dataclass
class _Run:
    first: int  # first query block
    blocks: int
    ranges: list[_Range]


def runs_of(pattern: BlockPattern, bp: int = 0, hp: int = 0) -> list[_Run]:
    """Group consecutive query blocks whose ranges move by constant steps (see module doc)."""
    runs: list[_Run] = []
    prev: Optional[list[tuple[int, int, bool]]] = None
    for qb in range(pattern.num_q_blocks):
        cur = key_ranges(pattern, qb, bp, hp)
        run = runs[-1] if runs else None
        if run is not None and prev is not None and _continues(run, prev, cur):
            if run.blocks == 1:
                for r, (s, _, _), (s0, _, _) in zip(run.ranges, cur, prev):
                    r.step = s - s0
            run.blocks += 1
        else:
            runs.append(_Run(qb, 1, [_Range(s, e - s, 0, f) for s, e, f in cur]))
        prev = cur
    return runs


def _continues(run: _Run, prev, cur) -> bool:
    if len(prev) != len(cur):
        return False
    for r, (s0, e0, f0), (s, e, f) in zip(run.ranges, prev, cur):
        if e - s != e0 - s0 or f != f0 or s < s0:
            return False
        if run.blocks > 1 and s - s0 != r.step:
            return False
    return True


def _range_mask(pattern: BlockPattern, run: _Run, rng: _Range, bp: int, hp: int, dtype: torch.dtype):
    """(mask, causal) of one range of a run: None / the kernel's causal rule / an additive
    mask (1, 1, Bq, L) shared by the blocks or (blocks, 1, Bq, L)."""
    if rng.full or pattern.mask_mod is None:
        return None, False
    device = pattern.kv_blocks.device
    bq, n = pattern.block_q, run.blocks
    q_pos = ((torch.arange(run.first, run.first + n, device=device) * bq)[:, None] + torch.arange(bq, device=device))
    q_pos = (q_pos + pattern.q_offset)[:, :, None]  # (n, Bq, 1)
    k_pos = (torch.arange(n, device=device) * rng.step + rng.start)[:, None] + torch.arange(rng.length, device=device)
    b = torch.full((), bp, dtype=torch.long, device=device)
    h = torch.full((), hp, dtype=torch.long, device=device)
    allowed = pattern.mask_mod(b, h, q_pos, k_pos[:, None, :]).expand(n, bq, rng.length)
    if bool(allowed.all()):
        return None, False
    shared = bool((allowed == allowed[:1]).all())
    if shared and rng.length == bq:
        tri = torch.ones(bq, bq, dtype=torch.bool, device=device).tril()
        if torch.equal(allowed[0], tri):
            return None, True
    if shared:
        return additive(allowed[:1].unsqueeze(1), dtype), False
    return additive(allowed.unsqueeze(1), dtype), False


def range_plan(pattern: BlockPattern, dtype: torch.dtype, name: str = "ranges") -> Plan:
    """The plan of ``pattern`` on the range kernel (compute ``dtype`` for the masks)."""
    bp_n, hp_n = pattern.kv_blocks.shape[:2]
    shared = bp_n == 1 and hp_n == 1 and (pattern.mask_mod is None or pattern.position_only)
    runs: dict[tuple[int, int], list[_Run]] = {}
    masks: dict[tuple[int, int, int, int], list] = {}

    def prepared(bl: int, hl: int, b: int, h: int) -> list:
        """Runs of lists (bl, hl) with their masks for batch b, query head h."""
        if (bl, hl) not in runs:
            runs[(bl, hl)] = runs_of(pattern, bl, hl)
        if (bl, hl, b, h) not in masks:
            masks[(bl, hl, b, h)] = [
                (run, [(rng, *_range_mask(pattern, run, rng, b, h, dtype)) for rng in run.ranges]) for run in runs[(bl, hl)]
            ]
        return masks[(bl, hl, b, h)]

    def calls(geo: Geometry, scratch):
        bq, group = pattern.block_q, geo.group
        for b in range(geo.batch):
            if shared:  # every KV head's query heads g, g + group, ... in one call
                heads = [(g, group, geo.kv_heads, 0, prepared(0, 0, 0, 0)) for g in range(group)]
            else:
                bl = b if bp_n > 1 else 0
                heads = [(h, 1, 1, h // group, prepared(bl, h if hp_n > 1 else 0, b, h)) for h in range(geo.q_heads)]
            for head0, step, count, kv0, work in heads:
                for run, ranges in work:
                    rows = RowSel(b, head0, step, count, run.first * bq, bq, run.blocks)
                    for rng, mask, causal in ranges:
                        keys = WindowKeys(b, kv0, 1, count, rng.start, rng.length, rng.step, run.blocks)
                        yield Call(rows, keys, mask=mask, causal=causal)

    q_pad = cdiv(pattern.q_len, pattern.block_q) * pattern.block_q - pattern.q_len
    return Plan(name, calls, q_pad=q_pad)
