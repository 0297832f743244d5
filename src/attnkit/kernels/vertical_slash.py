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
import torch.nn.functional as F

from .cpu_flash import flash_with_lse
from .pattern import BlockPattern, causal_mod, cdiv, lists_from_block_mask

_MASKED = -1e30  # finite: -inf in an additive mask sends the CPU kernel down a slow path
DEFAULT_BUDGET_ELEMS = 1 << 25  # floats of gathered K/V per chunk step (~128 MiB fp32): few, large calls


class Scratch:
    """Reusable gather buffers, one flat tensor per name, grown on demand.

    Gathering K/V rows into a freshly allocated tensor costs more in page faults than the
    copy itself (a large CPU allocation is mapped anew and zero-filled on every call);
    reusing one buffer per call of the kernel makes the gather ~5x cheaper.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def view(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (dtype/device of ``like``) backed by buffer ``name``."""
        numel = 1
        for n in shape:
            numel *= n
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:numel].view(shape)

    def gather_rows(self, name: str, src: torch.Tensor, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """``src.index_select(0, rows).view(shape)`` into the reusable buffer ``name``."""
        out = self.view(name, (rows.numel(), *src.shape[1:]), src)
        torch.index_select(src, 0, rows, out=out)
        return out.view(shape)


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


def vertical_slash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: VerticalSlashIndex,
    scale: float,
    budget_elems: int = DEFAULT_BUDGET_ELEMS,
) -> torch.Tensor:
    """Causal attention over a vertical-slash pattern.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv) in q's dtype.
    Every query row sees at least its own key (d = 0 must be a slash of every head).
    """
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    block = index.block
    nqb = index.num_blocks
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    p0 = index.block_starts(q.device)
    pad_front = max([int(s.max()) for hs in index.slashes for s in hs if s.numel()] + [0]) + block
    # Queries padded to whole blocks; keys padded in front (runs of early blocks start
    # before key 0) and at the back (the last diagonal tile may run past Nk).
    pad_back = nqb * block - nq
    out = torch.empty(b, hq, nq, dv, dtype=q.dtype, device=q.device)
    scratch = Scratch()
    for bb in range(b):
        for kh in range(hkv):
            kp = F.pad(k[bb, kh].to(compute), (0, 0, pad_front, pad_back)).contiguous()
            vp = F.pad(v[bb, kh].to(compute), (0, 0, pad_front, pad_back)).contiguous()
            for hh in range(kh * group, (kh + 1) * group):
                qh = F.pad(q[bb, hh].to(compute), (0, 0, 0, pad_back)).view(nqb, 1, block, d)
                res = _one_head(qh, kp, vp, index.verticals[bb][hh], index.slashes[bb][hh], p0, pad_front, nk, block, scale, budget_elems, scratch)
                out[bb, hh] = res.reshape(nqb * block, dv)[:nq].to(q.dtype)
    return out


def _one_head(qh, kp, vp, cols, slashes, p0, pad_front, nk, block, scale, budget_elems, scratch):
    """(nQB, 1, block, D) queries of one head -> (nQB, 1, block, Dv)."""
    nqb, d = qh.shape[0], qh.shape[-1]
    dv = vp.shape[-1]
    dlo, dhi = slash_groups(slashes, block)
    runs = _runs(dlo, dhi, block)
    width = sum(length for _, length in runs)
    col_mask = None
    if cols.numel():
        visible = _column_visibility(cols, slashes, p0, block, nk)
        col_mask = torch.zeros(nqb, 1, 1, cols.numel(), dtype=qh.dtype, device=qh.device)
        col_mask.masked_fill_(~visible.view(nqb, 1, 1, -1), _MASKED)
        col_live = visible.any(dim=1)
        col_k, col_v = kp[cols + pad_front], vp[cols + pad_front]
    per_block = max(1, width + cols.numel()) * (d + dv)
    chunk = max(1, min(nqb, budget_elems // per_block))
    out = torch.empty(nqb, 1, block, dv, dtype=qh.dtype, device=qh.device)
    for c0 in range(0, nqb, chunk):
        c1 = min(nqb, c0 + chunk)
        n = c1 - c0
        qc = qh[c0:c1]
        base = int(p0[c0]) + pad_front  # padded index of p0 of the first block in the chunk
        # 2. diagonal tiles: keys [p0, p0 + block), causal inside the tile.
        tk = kp.as_strided((n, 1, block, d), (block * d, 0, d, 1), base * d)
        tv = vp.as_strided((n, 1, block, dv), (block * dv, 0, dv, 1), base * dv)
        parts = [flash_with_lse(qc, tk, tv, True, scale)]
        # 1. slash runs before p0, gathered per block (one row gather: a cat of the
        # overlapping strided views is much slower on the CPU).
        offsets, mask = _live_runs(runs, p0[c0:c1], qh.dtype)
        if offsets is not None:
            w = offsets.numel()
            rows = (p0[c0:c1, None] + pad_front + offsets[None, :]).flatten()
            keys = scratch.gather_rows("k", kp, rows, (n, 1, w, d))
            vals = scratch.gather_rows("v", vp, rows, (n, 1, w, dv))
            parts.append(flash_with_lse(qc, keys, vals, False, scale, attn_mask=mask))
        # 3. columns before p0 that no run of the block covers.
        if col_mask is not None and bool(col_live[c0:c1].any()):
            upto = int(torch.searchsorted(cols, p0[c1 - 1]))  # later columns are hidden from the whole chunk
            ck = col_k[:upto].expand(n, 1, upto, d)
            cv = col_v[:upto].expand(n, 1, upto, dv)
            parts.append(flash_with_lse(qc, ck, cv, False, scale, attn_mask=col_mask[c0:c1, :, :, :upto]))
        out[c0:c1] = _merge(parts)
    return out


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
    mask = torch.zeros(p0.numel(), 1, 1, offsets.numel(), dtype=dtype, device=p0.device)
    mask.masked_fill_(before_start.view(p0.numel(), 1, 1, -1), _MASKED)
    return offsets, mask


def _merge(parts):
    """Exact merge of attention over disjoint key sets: out = sum_i exp(lse_i - lse) out_i.

    A part whose rows saw only masked keys has lse ~ -1e30 and weight 0.
    """
    if len(parts) == 1:
        return parts[0][0]
    top = parts[0][1]
    for _, lse in parts[1:]:
        top = torch.maximum(top, lse)
    merged, norm = None, None
    for o, lse in parts:
        w = torch.exp(lse - top).unsqueeze(-1)
        merged = o * w if merged is None else merged.addcmul_(o, w)
        norm = w if norm is None else norm + w
    return merged.div_(norm)


def aligned_blocks_supported(pattern: BlockPattern) -> bool:
    """Whether ``block_attention`` can run the pattern: square blocks, block-aligned causal
    geometry (Nk - Nq a multiple of the block), every listed tile either wholly causal or
    the diagonal tile."""
    return pattern.block_q == pattern.block_k and pattern.q_offset % pattern.block_k == 0


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, scale: float, budget_elems: int = DEFAULT_BUDGET_ELEMS
) -> torch.Tensor:
    """Causal block-sparse attention with per-(batch, head) block lists, on fused SDPA calls.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D) (one KV head per query head; repeat for GQA).
    The pattern's element rule must be plain causality (``aligned_blocks_supported``).
    Per head and chunk of query blocks: the listed off-diagonal key blocks are gathered
    into one (blocks, keys) batch and run as one SDPA call (padding slots masked), the
    diagonal tile as one causal call; the two merge by log-sum-exp.
    """
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    block = pattern.block_q
    nqb, nkb = pattern.num_q_blocks, pattern.num_kv_blocks
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    diag_of = torch.arange(nqb, device=q.device) + pattern.q_offset // block  # key block of each diagonal tile
    pad_q, pad_k = nqb * block - nq, nkb * block - nk
    lists = pattern.kv_blocks
    out = torch.empty(b, h, nq, dv, dtype=q.dtype, device=q.device)
    scratch = Scratch()
    for bb in range(b):
        for hh in range(h):
            lst = lists[bb if lists.shape[0] > 1 else 0, hh if lists.shape[1] > 1 else 0]  # (nQB, K)
            off = torch.where(lst == diag_of[:, None], torch.full_like(lst, -1), lst)  # off-diagonal slots
            qh = F.pad(q[bb, hh].to(compute), (0, 0, 0, pad_q)).view(nqb, 1, block, d)
            kb = F.pad(k[bb, hh].to(compute), (0, 0, 0, pad_k)).view(nkb, block, d)
            vb = F.pad(v[bb, hh].to(compute), (0, 0, 0, pad_k)).view(nkb, block, dv)
            res = torch.empty(nqb, 1, block, dv, dtype=compute, device=q.device)
            width = max(1, int((off >= 0).sum(-1).max()))
            chunk = max(1, min(nqb, budget_elems // (width * block * (d + dv))))
            for c0 in range(0, nqb, chunk):
                c1 = min(nqb, c0 + chunk)
                n = c1 - c0
                slots = off[c0:c1]
                order = torch.sort(torch.where(slots >= 0, slots, nkb), dim=-1).values[:, :width]
                live = order < nkb
                idx = order.clamp(max=nkb - 1)
                parts = []
                dk = diag_of[c0:c1]
                tk, tv = kb[dk].view(n, 1, block, d), vb[dk].view(n, 1, block, dv)
                parts.append(flash_with_lse(qh[c0:c1], tk, tv, True, scale))
                if bool(live.any()):
                    keys = scratch.gather_rows("k", kb, idx.flatten(), (n, 1, width * block, d))
                    vals = scratch.gather_rows("v", vb, idx.flatten(), (n, 1, width * block, dv))
                    mask = None
                    if not bool(live.all()):
                        mask = torch.zeros(n, 1, 1, width, block, dtype=compute, device=q.device)
                        mask.masked_fill_(~live.view(n, 1, 1, width, 1), _MASKED)
                        mask = mask.view(n, 1, 1, width * block)
                    parts.append(flash_with_lse(qh[c0:c1], keys, vals, False, scale, attn_mask=mask))
                res[c0:c1] = _merge(parts)
            out[bb, hh] = res.view(nqb * block, dv)[:nq].to(q.dtype)
    return out


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


__all__ = ["VerticalSlashIndex", "aligned_blocks_supported", "block_attention", "count_pairs", "slash_groups", "to_block_pattern", "vertical_slash_attention"]
