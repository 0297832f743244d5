"""Vertical-slash attention on the CPU: selected columns + selected diagonals, no Nq x Nk tensor.

The pattern (MInference, arXiv:2407.02490), per (batch, query head): a set of key
columns ``verticals`` and a set of diagonal offsets ``slashes`` (d = q_pos - k_pos >= 0,
d = 0 always included). Queries are cut into blocks of ``block`` rows; query block b
covers absolute positions [p0, p0 + block). As in MInference's kernel, a slash d makes
the query block attend to the whole key run [p0 - d, p0 + block - 1 - d] that the
diagonal crosses (so a slash is a diagonal band ``block`` keys wide, computed as dense
tiles). The allowed set is exactly

    causal  AND  (k in verticals  OR  some d in slashes with p0 - k <= d <= p0 + block - 1 - k)

and a key selected both ways counts once.

How it runs, per (batch, head), for chunks of query blocks (all zero-padding masked):

1. runs: slashes closer than ``block`` apart merge into groups [dlo, dhi]; group g gives
   every query block the key run [p0 - dhi, p0 + block - 1 - dlo], a sliding window, so
   the part before p0 (visible to every row of the block) is one row gather of K/V per
   chunk of blocks, run as one fused SDPA call with the blocks as the batch dimension;
2. the diagonal tile [p0, p0 + block): one causal SDPA call (d = 0 is a slash);
3. columns before p0 that no run of the block covers: one SDPA call over the gathered
   columns, shared by all blocks, with a per-block key mask;

and the three partial results merge exactly by log-sum-exp (as FlashAttention merges its
tiles). The CPU flash kernel does the arithmetic, so this runs at dense-SDPA efficiency on
the selected keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pattern import BlockPattern, causal_mod, cdiv, lists_from_block_mask
from .tiled import Call, GatheredKeys, Geometry, Plan, RowSel, WindowKeys, additive

DEFAULT_BUDGET_ELEMS = 1 << 22  # floats of gathered K/V per call (16 MiB fp32: large calls whose buffers malloc recycles)


@dataclass
class VerticalSlashIndex:
    """Selected columns and diagonals of every (batch, query head).

    verticals: list over (b, h) of sorted LongTensors of key positions.
    slashes: list over (b, h) of sorted LongTensors of diagonal offsets d >= 0 (0 included).
    block: query rows per block (the width of a slash run). q_len, kv_len: Nq, Nk.
    """

    verticals: list[list[torch.Tensor]]
    slashes: list[list[torch.Tensor]]
    block: int
    q_len: int
    kv_len: int

    @property
    def q_offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def num_blocks(self) -> int:
        return cdiv(self.q_len, self.block)

    def block_starts(self, device=None) -> torch.Tensor:
        """(nQB,) absolute position p0 of each query block."""
        return torch.arange(self.num_blocks, device=device) * self.block + self.q_offset


def slash_groups(slashes: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted offsets -> (dlo, dhi) of groups whose runs touch (gaps of at most ``block``)."""
    if slashes.numel() == 0:
        empty = slashes.new_empty(0)
        return empty, empty
    new = torch.ones_like(slashes, dtype=torch.bool)
    new[1:] = (slashes[1:] - slashes[:-1]) > block
    starts = new.nonzero().squeeze(1)
    ends = torch.cat([starts[1:] - 1, starts.new_tensor([slashes.numel() - 1])])
    return slashes[starts], slashes[ends]



def _covered_offsets(slashes: torch.Tensor, block: int, kv_len: int) -> torch.Tensor:
    """(Nk + block,) bool T: a key at x = p0 - k lies in a slash run of the block at p0 iff T[x].

    (Some d in slashes has x <= d <= x + block - 1, i.e. x in [d - block + 1, d]; x may be
    negative down to -(block - 1): T is indexed at x + block - 1.)
    """
    size = kv_len + block
    diff = torch.zeros(size + 1, dtype=torch.int32, device=slashes.device)
    dlo, dhi = slash_groups(slashes, block)
    ones = torch.ones_like(dlo, dtype=torch.int32)
    diff.index_add_(0, (dlo - block + 1 + block - 1).clamp(0, size), ones)
    diff.index_add_(0, (dhi + 1 + block - 1).clamp(0, size), -ones)
    return diff.cumsum(0)[:size] > 0


def _column_visibility(cols: torch.Tensor, slashes: torch.Tensor, p0: torch.Tensor, block: int, kv_len: int) -> torch.Tensor:
    """(nQB, V) bool: column visible to the whole block (before p0) and not inside a run."""
    table = _covered_offsets(slashes, block, kv_len)
    x = p0[:, None] - cols[None, :]
    return (x > 0) & ~table[(x + block - 1).clamp(0, table.numel() - 1)]


def _runs(dlo: torch.Tensor, dhi: torch.Tensor, block: int) -> list[tuple[int, int]]:
    """[(first offset, length)] of each group's run relative to p0, clipped before p0."""
    out = []
    for lo, hi in zip(dlo.tolist(), dhi.tolist()):
        end = min(block - 1 - lo, -1)  # last key - p0
        start = -hi
        if end >= start:
            out.append((start, end - start + 1))
    return out


def count_pairs(index: VerticalSlashIndex, device=None) -> int:
    """Allowed (query, key) pairs over all (batch, head), without an Nq x Nk tensor."""
    block, nk = index.block, index.kv_len
    p0 = index.block_starts(device)
    rows = torch.clamp(index.q_len - (p0 - index.q_offset), max=block)
    total = 0
    for b, heads in enumerate(index.slashes):
        for h, slashes in enumerate(heads):
            dlo, dhi = slash_groups(slashes, block)
            per_block = torch.zeros_like(p0)
            for start, length in _runs(dlo, dhi, block):
                first = (p0 + start).clamp(min=0)
                per_block += (p0 + start + length - first).clamp(min=0)
            cols = index.verticals[b][h]
            if cols.numel():
                per_block += _column_visibility(cols, slashes, p0, block, nk).sum(1)
            total += int((rows * per_block + rows * (rows + 1) // 2).sum())
    return total


def vertical_slash_plan(index: VerticalSlashIndex, dtype: torch.dtype, budget_elems: int = DEFAULT_BUDGET_ELEMS,
                        name: str = "vertical_slash") -> Plan:
    """The plan of a vertical-slash index (causal; see module doc): per (batch, query
    head) and chunk of query blocks, the diagonal tiles (one causal call, blocks as the
    batch), the slash runs (one gathered call) and the columns (one call, keys shared by
    the blocks). Every query row sees at least its own key (d = 0 is a slash of every head)."""
    block, nqb = index.block, index.num_blocks
    # Keys padded at the back (the last diagonal tile may run past Nk), queries to whole
    # blocks; a run's keys before key 0 are read at key 0 and masked (no front padding:
    # it would copy K and V at up to twice their length).
    pad_back = nqb * block - index.q_len

    def calls(geo: Geometry, scratch):
        p0 = index.block_starts(index.slashes[0][0].device)
        group = geo.group
        for b in range(geo.batch):
            for h in range(geo.q_heads):
                yield from _head_calls(index.verticals[b][h], index.slashes[b][h], p0, b, h, h // group,
                                       index.kv_len, block, geo.head_size, budget_elems, dtype, scratch)

    return Plan(name, calls, q_pad=pad_back, k_back=pad_back)


def _head_calls(cols, slashes, p0, b, h, kh, nk, block, e, budget_elems, dtype, scratch):
    """Calls of one query head h (KV head kh) over all its query blocks."""
    nqb = p0.numel()
    runs = _runs(*slash_groups(slashes, block), block)
    width = sum(length for _, length in runs)
    col_mask = col_live = None
    if cols.numel():
        visible = _column_visibility(cols, slashes, p0, block, nk)
        col_mask = additive(visible.view(nqb, 1, 1, -1), dtype)
        col_live = visible.any(dim=1)
    chunk = max(1, min(nqb, budget_elems // (max(1, width + cols.numel()) * 2 * e)))
    for c0 in range(0, nqb, chunk):
        c1 = min(nqb, c0 + chunk)
        n = c1 - c0
        rows = RowSel(b, h, 1, 1, c0 * block, block, n)
        # diagonal tiles: keys [p0, p0 + block), causal inside the tile
        yield Call(rows, WindowKeys(b, kh, 1, 1, int(p0[c0]), block, block, n), causal=True)
        # slash runs before p0, gathered per block
        offsets, mask = _live_runs(runs, p0[c0:c1], dtype)
        if offsets is not None:
            positions = (p0[c0:c1, None] + offsets[None, :]).clamp(min=0)  # keys before 0: masked
            yield Call(rows, GatheredKeys(b, kh, 1, 1, positions, scratch=scratch), mask=mask)
        # columns before p0 that no run of the block covers (later columns are hidden from the whole chunk)
        if col_mask is not None and bool(col_live[c0:c1].any()):
            upto = int(torch.searchsorted(cols, p0[c1 - 1]))
            keys = GatheredKeys(b, kh, 1, 1, cols[:upto].view(1, upto), scratch=scratch, blocks=n)
            yield Call(rows, keys, mask=col_mask[c0:c1, :, :, :upto])


def _live_runs(runs: list[tuple[int, int]], p0: torch.Tensor, dtype: torch.dtype):
    """Key offsets (relative to p0) of the runs that reach key 0 for some block of a chunk,
    and the (n, 1, 1, W) additive mask of the keys before key 0 (None if there are none).

    p0: (n,) block starts of the chunk. A diagonal run farther back than the chunk's last
    block start lies wholly before key 0 for the whole chunk and is skipped (with
    scattered diagonals, half of the run work would otherwise be masked keys).
    """
    last = int(p0[-1])
    live = [(start, length) for start, length in runs if last + start + length - 1 >= 0]
    if not live:
        return None, None
    offsets = torch.cat([torch.arange(s, s + length, device=p0.device) for s, length in live])
    before_start = (p0[:, None] + offsets[None, :]) < 0
    if not bool(before_start.any()):
        return offsets, None
    return offsets, additive(~before_start.view(p0.numel(), 1, 1, -1), dtype)


def aligned_blocks_supported(pattern: BlockPattern) -> str | None:
    """Why ``blocks_plan`` cannot run the pattern, or None: it needs square blocks,
    block-aligned causal geometry (Nk - Nq a multiple of the block) and plain causality as
    the element rule (every listed tile wholly causal or the diagonal tile)."""
    if pattern.block_q != pattern.block_k:
        return f"blocks are not square ({pattern.block_q} x {pattern.block_k})"
    if pattern.q_offset % pattern.block_k:
        return f"Nk - Nq = {pattern.q_offset} is not a multiple of the block ({pattern.block_k})"
    if pattern.mask_mod is not causal_mod:
        return "the element rule is not plain causality"
    lists = pattern.kv_blocks
    diag = (torch.arange(pattern.num_q_blocks, device=lists.device) + pattern.q_offset // pattern.block_k)[:, None]
    if not bool(((lists < 0) | (lists <= diag)).all()):
        return "a listed tile lies above the diagonal"
    if not bool((lists == diag).any(-1).all()):
        return "a query block does not list its diagonal tile"
    return None


def blocks_plan(pattern: BlockPattern, dtype: torch.dtype, budget_elems: int = DEFAULT_BUDGET_ELEMS, name: str = "blocks") -> Plan:
    """Causal block-sparse attention with per-(batch, head) block lists, as fused calls.

    The pattern's element rule must be plain causality (``aligned_blocks_supported``).
    Per (batch, query head) and chunk of query blocks: the diagonal tiles as one causal
    call (blocks as the batch), the listed off-diagonal key blocks gathered into one call
    (padding slots masked)."""
    block = pattern.block_q
    nqb, nkb = pattern.num_q_blocks, pattern.num_kv_blocks
    lists = pattern.kv_blocks

    def calls(geo: Geometry, scratch):
        device = lists.device
        diag_of = torch.arange(nqb, device=device) + pattern.q_offset // block  # key block of each diagonal tile
        for b in range(geo.batch):
            for h in range(geo.q_heads):
                lst = lists[b if lists.shape[0] > 1 else 0, h if lists.shape[1] > 1 else 0]  # (nQB, K)
                off = torch.where(lst == diag_of[:, None], torch.full_like(lst, -1), lst)  # off-diagonal slots
                width = max(1, int((off >= 0).sum(-1).max()))
                chunk = max(1, min(nqb, budget_elems // (width * block * 2 * geo.head_size)))
                kh = h // geo.group
                for c0 in range(0, nqb, chunk):
                    c1 = min(nqb, c0 + chunk)
                    n = c1 - c0
                    rows = RowSel(b, h, 1, 1, c0 * block, block, n)
                    yield Call(rows, WindowKeys(b, kh, 1, 1, int(diag_of[c0]) * block, block, block, n), causal=True)
                    slots = off[c0:c1]
                    order = torch.sort(torch.where(slots >= 0, slots, nkb), dim=-1).values[:, :width]
                    live = order < nkb
                    if not bool(live.any()):
                        continue
                    positions = (order.clamp(max=nkb - 1) * block)[:, :, None] + torch.arange(block, device=device)
                    mask = None
                    if not bool(live.all()):
                        mask = additive(live.view(n, 1, 1, width, 1).expand(n, 1, 1, width, block).reshape(n, 1, 1, width * block), dtype)
                    yield Call(rows, GatheredKeys(b, kh, 1, 1, positions.view(n, width * block), scratch=scratch), mask=mask)

    return Plan(name, calls, q_pad=nqb * block - pattern.q_len, k_back=nkb * block - pattern.kv_len)


def to_block_pattern(index: VerticalSlashIndex, block_k: int = 64) -> BlockPattern:
    """The BlockPattern with exactly the same allowed set (for stats and the other kernels).

    Tiles are ``index.block`` queries x ``block_k`` keys; the element rule looks the key
    up in per-head column / diagonal tables of length Nk (no Nq x Nk tensor).
    """
    block, nk = index.block, index.kv_len
    bsz, heads = len(index.slashes), len(index.slashes[0])
    device = index.slashes[0][0].device
    nqb, nkb = index.num_blocks, cdiv(nk, block_k)
    p0 = index.block_starts(device)
    vert = torch.zeros(bsz, heads, nk, dtype=torch.bool, device=device)
    table = torch.zeros(bsz, heads, nk + block, dtype=torch.bool, device=device)
    diff = torch.zeros(bsz, heads, nqb, nkb + 1, dtype=torch.long, device=device)
    colmask = torch.zeros(bsz, heads, nqb, nkb, dtype=torch.bool, device=device)
    last_row = torch.clamp(p0 + block - 1, max=nk - 1)
    for b in range(bsz):
        for h in range(heads):
            slashes, cols = index.slashes[b][h], index.verticals[b][h]
            vert[b, h, cols] = True
            table[b, h] = _covered_offsets(slashes, block, nk)
            dlo, dhi = slash_groups(slashes, block)
            for lo, hi in zip(dlo.tolist(), dhi.tolist()):
                first = (p0 - hi).clamp(min=0)
                last = torch.minimum(p0 + block - 1 - lo, last_row)
                ok = first <= last
                rows = torch.arange(nqb, device=device)[ok]
                diff[b, h, rows, first[ok] // block_k] += 1
                diff[b, h, rows, last[ok] // block_k + 1] -= 1  # one run per row: no duplicates
            if cols.numel():
                seen = cols[None, :] <= last_row[:, None]
                rows, which = seen.nonzero(as_tuple=True)
                colmask[b, h, rows, cols[which] // block_k] = True
    listed = (diff.cumsum(-1)[..., :nkb] > 0) | colmask
    offset = index.q_offset

    def vertical_slash(bb, hh, q_pos, k_pos):
        start = torch.div(q_pos - offset, block, rounding_mode="floor") * block + offset
        kk = k_pos.clamp(0, nk - 1)
        x = (start - k_pos + block - 1).clamp(0, nk + block - 1)
        return vert[bb, hh, kk] | table[bb, hh, x]

    def rule(bb, hh, q_pos, k_pos):
        return causal_mod(bb, hh, q_pos, k_pos) & vertical_slash(bb, hh, q_pos, k_pos)

    return BlockPattern(
        kv_blocks=lists_from_block_mask(listed),
        block_q=block,
        block_k=block_k,
        q_len=index.q_len,
        kv_len=nk,
        mask_mod=rule,
    )


__all__ = ["VerticalSlashIndex", "aligned_blocks_supported", "blocks_plan", "count_pairs", "slash_groups", "to_block_pattern", "vertical_slash_plan"]
