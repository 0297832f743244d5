"""Range kernel: a block pattern run as a few fused calls over contiguous key ranges.

Consecutive listed key blocks of a query block merge into contiguous key ranges; a range
whose tiles are all full runs unmasked, a range holding a partial tile runs with the
pattern's element rule as an additive mask of that range (or as the fused kernel's own
causal rule when the rule is exactly the tile's diagonal triangle). K/V are sliced,
never gathered; GQA query heads are served by their KV head's slice.

Fewer, larger calls: a range followed from query block to query block with the same
length and flag and a start moving by a constant step (0 for sink columns and global
tokens, one block for a sliding window) is a *lane*, and each lane is one fused call
with the blocks as the batch dimension (keys as a strided, overlapping view; the mask
shared when it is the same for every block). Ranges that follow no lane (BigBird's
random blocks, a window range merged with a neighbour) are gathered per block into one
call per span of such blocks, with their rule as a per-block mask. A sliding window at
16k is a handful of calls, not hundreds.

The pattern may be shared by all batches and heads (the fast case: every KV head's query
heads in one call) or differ per (batch, head) (run head by head). The element rule of a
shared pattern must not depend on the batch or head (it is evaluated at b = h = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .pattern import BlockPattern, cdiv
from .tiled import Call, GatheredKeys, Geometry, Plan, RowSel, WindowKeys, additive


def key_ranges(pattern: BlockPattern, q_block: int, bp: int = 0, hp: int = 0) -> list[tuple[int, int, bool]]:
    """Contiguous key ranges [start, end) of one query block, with ``full`` flags."""
    return _merge_tiles(_tiles(pattern, q_block, bp, hp), pattern.block_k, pattern.kv_len)


def _tiles(pattern: BlockPattern, q_block: int, bp: int, hp: int) -> list[tuple[int, bool]]:
    """(key block, full) of the tiles one query block lists."""
    lists = pattern.kv_blocks[bp, hp, q_block]
    count = int((lists >= 0).sum())
    blocks = lists[:count].tolist()
    full = pattern.full_tiles[bp, hp, q_block, :count].tolist() if pattern.full_tiles is not None else [False] * count
    return list(zip(blocks, (bool(f) for f in full)))


def _merge_tiles(tiles: list[tuple[int, bool]], bk: int, nk: int, kinds: list | None = None) -> list[tuple]:
    """Ascending tiles -> contiguous key ranges (start, end, full) of tiles with one
    ``full`` flag; with ``kinds`` (one per tile), (start, end, full, kind) and tiles of
    different kinds never merge."""
    ranges: list[list] = []
    for i, (block, is_full) in enumerate(tiles):
        start, end = block * bk, min(nk, (block + 1) * bk)
        is_full = is_full and end - start == bk
        kind = None if kinds is None else kinds[i]
        if ranges and ranges[-1][1] == start and ranges[-1][2] == is_full and ranges[-1][3] == kind:
            ranges[-1][1] = end
        else:
            ranges.append([start, end, is_full, kind])
    return [tuple(r) if kinds is not None else tuple(r[:3]) for r in ranges]


def _structured(pattern: BlockPattern, bp: int, hp: int) -> list[tuple[list[tuple[int, int, bool, str]], list]]:
    """Per query block, (ranges that may follow a lane, with their kind; other tiles).

    A tile's *relative chain* is the run of consecutive query blocks that list the key
    block shifted along with them (a window, a band), its *absolute chain* the run that
    lists the same key block (sinks, global tokens); a tile takes the kind ("rel" or
    "abs") of its longer chain, and a tile in no chain of two blocks or more (e.g.
    BigBird's random blocks) follows no lane. Tiles of different kinds never merge into
    one range, so a random block next to a window does not change the window's range."""
    nqb, bq, bk = pattern.num_q_blocks, pattern.block_q, pattern.block_k
    shift = bq // bk if bq % bk == 0 else None
    tiles = [_tiles(pattern, qb, bp, hp) for qb in range(nqb)]
    sets = [{kb for kb, _ in t} for t in tiles]
    rel = _chain_lengths(sets, shift) if shift is not None else None
    absolute = _chain_lengths(sets, 0)
    out = []
    for qb, t in enumerate(tiles):
        lane_tiles, kinds, other = [], [], []
        for tile in t:
            r = rel[qb][tile[0]] if rel is not None else 0
            a = absolute[qb][tile[0]]
            if r >= 2 and r >= a:
                lane_tiles.append(tile)
                kinds.append("rel")
            elif a >= 2:
                lane_tiles.append(tile)
                kinds.append("abs")
            else:
                other.append(tile)
        out.append((_merge_tiles(lane_tiles, bk, pattern.kv_len, kinds), other))
    return out


def _chain_lengths(sets: list[set], shift: int) -> list[dict[int, int]]:
    """Per query block and listed key block kb, the number of consecutive query blocks j
    around it that list key block kb + (j - qb) * shift."""
    back: list[dict[int, int]] = []
    for qb, keys in enumerate(sets):
        prev = back[qb - 1] if qb else {}
        back.append({kb: 1 + prev.get(kb - shift, 0) for kb in keys})
    fwd: list[dict[int, int]] = [dict() for _ in sets]
    for qb in range(len(sets) - 1, -1, -1):
        nxt = fwd[qb + 1] if qb + 1 < len(sets) else {}
        fwd[qb] = {kb: 1 + nxt.get(kb + shift, 0) for kb in sets[qb]}
    return [{kb: back[qb][kb] + fwd[qb][kb] - 1 for kb in keys} for qb, keys in enumerate(sets)]


# A lane this short is cheaper inside its blocks' gathered call than as a call of its own.
MIN_LANE_BLOCKS = 4
# Output elements of one call (8 MiB of fp32): larger pieces of a lane run as several calls.
ROW_BUDGET_ELEMS = 1 << 21


@dataclass
class _Lane:
    """One range followed across consecutive query blocks: block ``first + i`` reads keys
    [start + i * step, start + i * step + length)."""

    first: int
    blocks: int
    start: int
    length: int
    step: int
    full: bool


def lanes_of(pattern: BlockPattern, bp: int = 0, hp: int = 0) -> tuple[list[_Lane], dict[int, list[tuple[int, int, bool]]]]:
    """Follow each query block's key ranges into the next blocks (see module doc).

    A relative range keeps its start relative to the query block (it moves by one query
    block per block), an absolute one keeps its start; a lane is a run of consecutive
    blocks holding such a range with one length and flag. Returns the lanes of at least
    ``MIN_LANE_BLOCKS`` blocks, and per query block the ranges in no such lane (random
    blocks, a window cut by the start of the sequence), gathered into one call per span."""
    bq = pattern.block_q
    rest: dict[int, list[tuple[int, int, bool]]] = {}
    chains: dict[tuple, list[tuple[int, int, int, bool]]] = {}
    for qb, (ranges, other) in enumerate(_structured(pattern, bp, hp)):
        if other:
            rest[qb] = _merge_tiles(other, pattern.block_k, pattern.kv_len)
        for s, e, f, kind in ranges:
            key = (kind, s - qb * bq if kind == "rel" else s)
            chains.setdefault(key, []).append((qb, s, e - s, f))
    lanes: list[_Lane] = []
    for (kind, _), items in chains.items():
        run = [items[0]]
        for item in items[1:] + [None]:
            if item is not None and item[0] == run[-1][0] + 1 and item[2:] == run[-1][2:]:
                run.append(item)
                continue
            if len(run) >= MIN_LANE_BLOCKS:
                qb, s, length, f = run[0]
                lanes.append(_Lane(qb, len(run), s, length, bq if kind == "rel" else 0, f))
            else:
                for qb, s, length, f in run:
                    rest.setdefault(qb, []).append((s, s + length, f))
            run = [item]
    for ranges in rest.values():
        ranges.sort()
    return sorted(lanes, key=lambda lane: (lane.first, lane.start)), rest


def _lane_mask(pattern: BlockPattern, lane: _Lane, b: int, h: int, dtype: torch.dtype):
    """(mask, causal) of a lane: None / the kernel's causal rule / an additive mask
    (1, 1, Bq, L) shared by the blocks or (blocks, 1, Bq, L)."""
    if lane.full or pattern.mask_mod is None:
        return None, False
    device = pattern.kv_blocks.device
    bq, n = pattern.block_q, lane.blocks
    q_pos = ((torch.arange(lane.first, lane.first + n, device=device) * bq)[:, None] + torch.arange(bq, device=device))
    q_pos = (q_pos + pattern.q_offset)[:, :, None]  # (n, Bq, 1)
    k_pos = (torch.arange(n, device=device) * lane.step + lane.start)[:, None] + torch.arange(lane.length, device=device)
    allowed = _rule(pattern, b, h, q_pos, k_pos[:, None, :]).expand(n, bq, lane.length)
    if bool(allowed.all()):
        return None, False
    shared = bool((allowed == allowed[:1]).all())
    if shared and lane.length == bq:
        tri = torch.ones(bq, bq, dtype=torch.bool, device=device).tril()
        if torch.equal(allowed[0], tri):
            return None, True
    if shared:
        return additive(allowed[:1].unsqueeze(1), dtype), False
    return additive(allowed.unsqueeze(1), dtype), False


def _rule(pattern: BlockPattern, b: int, h: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    device = q_pos.device
    bb = torch.full((), b, dtype=torch.long, device=device)
    hh = torch.full((), h, dtype=torch.long, device=device)
    return pattern.mask_mod(bb, hh, q_pos, k_pos)


def _gathered_spans(pattern: BlockPattern, rest: dict[int, list], b: int, h: int, dtype: torch.dtype,
                    budget_keys: int = 1 << 13) -> list[tuple[int, int, torch.Tensor, Optional[torch.Tensor]]]:
    """The ranges that follow no lane, as gathered calls: (first block, blocks, key
    positions (blocks, S), additive mask (blocks, 1, Bq, S) or None) per span of
    consecutive such blocks with the same number S of keys (at most ``budget_keys`` gathered keys per call and head: the
    reusable gather buffer stays small, ~16 MiB for 8 heads of 64 dims)."""
    device = pattern.kv_blocks.device
    bq = pattern.block_q
    out = []
    blocks = sorted(rest)
    i = 0
    while i < len(blocks):
        j = i + 1
        width = sum(e - s for s, e, _ in rest[blocks[i]])
        # a span holds consecutive blocks with as many keys each: no padding to mask
        while (j < len(blocks) and blocks[j] == blocks[j - 1] + 1 and (j - i + 1) * width <= budget_keys
               and sum(e - s for s, e, _ in rest[blocks[j]]) == width):
            j += 1
        span = blocks[i:j]
        positions = torch.zeros(len(span), width, dtype=torch.long, device=device)
        valid = torch.zeros(len(span), width, dtype=torch.bool, device=device)
        full = torch.zeros(len(span), width, dtype=torch.bool, device=device)
        for row, qb in enumerate(span):
            col = 0
            for s, e, f in rest[qb]:
                positions[row, col : col + e - s] = torch.arange(s, e, device=device)
                valid[row, col : col + e - s] = True
                full[row, col : col + e - s] = f
                col += e - s
        allowed = valid[:, None, :]
        if pattern.mask_mod is not None and not bool(full[valid].all()):
            q_pos = ((torch.tensor(span, device=device) * bq)[:, None] + torch.arange(bq, device=device)) + pattern.q_offset
            allowed = allowed & (full[:, None, :] | _rule(pattern, b, h, q_pos[:, :, None], positions[:, None, :]))
        mask = None if bool(allowed.all()) else additive(allowed.expand(len(span), bq, width).unsqueeze(1), dtype)
        out.append((span[0], len(span), positions, mask))
        i = j
    return out


def _segments(lanes: list, spans: list) -> list[tuple[int, int, list]]:
    """Cut lanes and gathered spans at each other's first and last blocks, so that the
    calls of one row segment are consecutive and merge into their rows once:
    [(first block, blocks, [("window", start, length, step, mask, causal) |
    ("gather", positions, mask)])] in block order."""
    cuts = sorted({x for lane, _, _ in lanes for x in (lane.first, lane.first + lane.blocks)}
                  | {x for first, blocks, _, _ in spans for x in (first, first + blocks)})
    pieces: dict[tuple[int, int], list] = {}
    for lane, mask, causal in lanes:
        end = lane.first + lane.blocks
        for a, z in zip(cuts, cuts[1:]):
            if a < lane.first or z > end:
                continue
            part = mask if mask is None or mask.shape[0] == 1 else mask[a - lane.first : z - lane.first]
            start = lane.start + (a - lane.first) * lane.step
            pieces.setdefault((a, z - a), []).append(("window", start, lane.length, lane.step, part, causal))
    for first, blocks, positions, mask in spans:
        for a, z in zip(cuts, cuts[1:]):
            if a < first or z > first + blocks:
                continue
            sel = slice(a - first, z - first)
            pieces.setdefault((a, z - a), []).append(("gather", positions[sel], None if mask is None else mask[sel]))
    return [(a, n, items) for (a, n), items in sorted(pieces.items())]


def _piece_call(item: tuple, rows: RowSel, b: int, kv0: int, count: int, a: int, n: int, scratch) -> Call:
    """The call of one segment item for blocks [a, a + n) of its segment."""
    if item[0] == "window":
        _, start, length, stride, mask, causal = item
        part = mask if mask is None or mask.shape[0] == 1 else mask[a : a + n]
        return Call(rows, WindowKeys(b, kv0, 1, count, start + a * stride, length, stride, n), mask=part, causal=causal)
    _, positions, mask = item
    return Call(rows, GatheredKeys(b, kv0, 1, count, positions[a : a + n], scratch=scratch),
                mask=None if mask is None else mask[a : a + n])


def range_plan(pattern: BlockPattern, dtype: torch.dtype, name: str = "ranges") -> Plan:
    """The plan of ``pattern`` on the range kernel (compute ``dtype`` for the masks)."""
    bp_n, hp_n = pattern.kv_blocks.shape[:2]
    shared = bp_n == 1 and hp_n == 1 and (pattern.mask_mod is None or pattern.position_only)
    structure: dict[tuple[int, int], tuple] = {}
    prepared_calls: dict[tuple[int, int, int, int], tuple] = {}

    def prepared(bl: int, hl: int, b: int, h: int) -> list:
        """Row segments of lists (bl, hl) with their calls' keys and masks, for batch b, query head h."""
        if (bl, hl) not in structure:
            structure[(bl, hl)] = lanes_of(pattern, bl, hl)
        if (bl, hl, b, h) not in prepared_calls:
            lanes, rest = structure[(bl, hl)]
            masked = [(lane, *_lane_mask(pattern, lane, b, h, dtype)) for lane in lanes]
            prepared_calls[(bl, hl, b, h)] = _segments(masked, _gathered_spans(pattern, rest, b, h, dtype))
        return prepared_calls[(bl, hl, b, h)]

    def calls(geo: Geometry, scratch):
        bq, group = pattern.block_q, geo.group
        for b in range(geo.batch):
            if shared:  # every KV head's query heads g, g + group, ... in one call
                heads = [(g, group, geo.kv_heads, 0, prepared(0, 0, 0, 0)) for g in range(group)]
            else:
                bl = b if bp_n > 1 else 0
                heads = [(h, 1, 1, h // group, prepared(bl, h if hp_n > 1 else 0, b, h)) for h in range(geo.q_heads)]
            for head0, step, count, kv0, segments in heads:
                # blocks per call: each call's output stays near ROW_BUDGET_ELEMS, so that the
                # kernel's output buffers are recycled by the allocator, not mapped anew per call
                most = max(1, ROW_BUDGET_ELEMS // (count * bq * geo.head_size))
                for first, blocks, items in segments:
                    for a in range(0, blocks, most):
                        n = min(most, blocks - a)
                        rows = RowSel(b, head0, step, count, (first + a) * bq, bq, n)  # one per piece: merged once
                        for item in items:
                            yield _piece_call(item, rows, b, kv0, count, a, n, scratch)

    q_pad = cdiv(pattern.q_len, pattern.block_q) * pattern.block_q - pattern.q_len
    return Plan(name, calls, q_pad=q_pad)
