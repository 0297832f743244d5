"""Block-sparse attention on the CPU (any device, in fact) with gathered key blocks.

For each chunk of query blocks the listed key blocks are gathered into a dense
(rows x keys) tile, scored with one batched matmul, masked by the pattern's element
rule, and merged across key chunks with a numerically stable online softmax
(log-sum-exp running max, as in FlashAttention). Memory is O(N * keys-per-query)
bounded by ``budget_elems`` per step; no Nq x Nk tensor is ever built.

GQA: when the pattern is the same for all heads the ``Hq / Hkv`` query heads that
share a KV head are folded into the rows of one tile, so K/V are gathered once per KV
head and never repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import validate
from .pattern import BlockPattern, lists_from_block_mask

DEFAULT_BUDGET_ELEMS = 1 << 22  # floats per step for scores + gathered K/V (~16 MiB fp32)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    scale: float,
    method: str = "?",
    budget_elems: int = DEFAULT_BUDGET_ELEMS,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over the pattern's allowed pairs.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv) in q's dtype.
    Raises ValueError naming the first query row that the pattern leaves without a key,
    unless ``return_lse``: then returns (out, lse) with lse (B, Hq, Nq) the log-sum-exp of
    each row's scaled scores (float32, float64 for float64 inputs), and a row without keys
    gets out 0 and lse -inf, so partial results over disjoint pairs can be combined with
    ``merge_partials``.
    """
    b, hq, nq, d = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    group = hq // hkv
    bq, bk = pattern.block_q, pattern.block_k
    nqb, nkb = pattern.num_q_blocks, pattern.num_kv_blocks
    lists = pattern.kv_blocks
    slots = lists.shape[-1]
    fold = lists.shape[1] == 1
    heads = hkv if fold else hq
    rows = group * bq if fold else bq
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    partial = _partial_slots(pattern)

    k_blocks = _pad_len(k, nkb * bk).view(b, hkv, nkb, bk, d)
    v_blocks = _pad_len(v, nkb * bk).view(b, hkv, nkb, bk, dv)
    q_tiles = _query_tiles(q, nqb, bq, hkv, fold)  # (B, heads, nQB, rows, D)
    geometry = _Geometry(q.device, b, hq, hkv, rows, bq, fold)

    slot_chunk = max(1, min(slots, budget_elems // max(1, b * heads * rows * bk)))
    per_qblock = b * heads * slot_chunk * bk * (rows + d + dv)
    q_chunk = max(1, min(nqb, budget_elems // max(1, per_qblock)))

    out = torch.empty(b, heads, nqb, rows, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, heads, nqb, rows, 1, dtype=compute, device=q.device) if return_lse else None
    for q0 in range(0, nqb, q_chunk):
        q1 = min(nqb, q0 + q_chunk)
        qc = q_tiles[:, :, q0:q1].to(compute) * scale
        q_pos = geometry.query_positions(q0, q1) + pattern.q_offset
        if slot_chunk == slots:
            scores, values = _tile_scores(qc, k_blocks, v_blocks, pattern, partial, q0, q1, 0, slots, q_pos, geometry)
            row_lse = torch.logsumexp(scores, dim=-1, keepdim=True) if lse is not None else None
            result = torch.matmul(torch.softmax(scores, dim=-1), values)
        else:
            result, row_lse = _online_softmax(qc, k_blocks, v_blocks, pattern, partial, q0, q1, slot_chunk, q_pos, geometry)
        if lse is None:
            _check_rows(result, geometry.query_positions(q0, q1) < nq, q0, bq, group, fold, method)
        else:
            result = result.nan_to_num(nan=0.0)
            lse[:, :, q0:q1] = row_lse
        out[:, :, q0:q1] = result.to(q.dtype)
    out = _untile(out, b, hq, hkv, nq, nqb, bq, dv, fold)
    if lse is None:
        return out
    return out, _untile(lse, b, hq, hkv, nq, nqb, bq, 1, fold)[..., 0]


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a union of disjoint pair sets from the (out, lse) of each set.

    out: (B, H, N, Dv), lse: (B, H, N) as returned by ``block_sparse_attention(...,
    return_lse=True)``: out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i.
    A row empty in every part comes out NaN (the caller reports it); returns (out, lse).
    """
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    compute = torch.promote_types(parts[0][0].dtype, lses.dtype)
    merged = None
    for out, part_lse in parts:
        term = out.to(compute) * torch.exp(part_lse - safe).to(compute).unsqueeze(-1)
        merged = term if merged is None else merged + term
    merged = merged.masked_fill(torch.isinf(total).unsqueeze(-1), float("nan"))
    return merged.to(parts[0][0].dtype), total


class _Geometry:
    """Index tensors that map tile rows to batches, heads and positions."""

    def __init__(self, device: torch.device, b: int, hq: int, hkv: int, rows: int, bq: int, fold: bool) -> None:
        group = hq // hkv
        self.device, self.bq, self.rows = device, bq, rows
        self.row_in_block = torch.arange(rows, device=device) % bq
        self.batch = torch.arange(b, device=device).view(b, 1, 1, 1)
        self.mod_batch = self.batch.view(b, 1, 1, 1, 1)
        if fold:
            self.kv_head = torch.arange(hkv, device=device).view(1, hkv, 1, 1)
            row_head = (torch.arange(rows, device=device) // bq).view(1, 1, 1, rows, 1)
            self.mod_head = self.kv_head.view(1, hkv, 1, 1, 1) * group + row_head
        else:
            self.kv_head = (torch.arange(hq, device=device) // group).view(1, hq, 1, 1)
            self.mod_head = torch.arange(hq, device=device).view(1, hq, 1, 1, 1)

    def query_positions(self, q0: int, q1: int) -> torch.Tensor:
        """(1, 1, c, rows, 1) query index (0-based, before the causal offset) of each tile row."""
        blocks = torch.arange(q0, q1, device=self.device).view(-1, 1) * self.bq
        return (blocks + self.row_in_block).view(1, 1, q1 - q0, self.rows, 1)


def _partial_slots(pattern: BlockPattern) -> torch.Tensor:
    """(Bp, Hp, nQB, P) slot numbers of listed tiles that need the element rule; -1 padded.

    A tile needs the rule unless the pattern marks it full; tiles running past Nk
    always do (their padded keys must be masked).
    """
    lists = pattern.kv_blocks
    needs = lists >= 0
    if pattern.full_tiles is not None:
        needs = needs & ~pattern.full_tiles
    if pattern.kv_len % pattern.block_k:
        needs = needs | (lists == pattern.num_kv_blocks - 1)
    return lists_from_block_mask(needs) if needs.any() else torch.full((*lists.shape[:-1], 1), -1, dtype=torch.long, device=lists.device)


def _tile_scores(qc, k_blocks, v_blocks, pattern, partial, q0, q1, s0, s1, q_pos, geometry):
    """Scores (B, H, c, rows, slots*Bk) of a tile with the pattern applied, and the gathered values."""
    b, heads = qc.shape[:2]
    bk = pattern.block_k
    idx = pattern.kv_blocks[:, :, q0:q1, s0:s1].expand(b, heads, q1 - q0, s1 - s0)
    safe = idx.clamp(min=0)
    keys = k_blocks[geometry.batch, geometry.kv_head, safe].to(qc.dtype).flatten(3, 4)
    values = v_blocks[geometry.batch, geometry.kv_head, safe].to(qc.dtype).flatten(3, 4)
    scores = torch.matmul(qc, keys.transpose(-1, -2))
    tiles = scores.view(*scores.shape[:4], s1 - s0, bk)
    if not bool((idx >= 0).all()):
        tiles.masked_fill_((idx < 0)[:, :, :, None, :, None], float("-inf"))
    slots_p = partial[:, :, q0:q1].expand(b, heads, q1 - q0, partial.shape[-1]) - s0
    for p in range(slots_p.shape[-1]):
        _mask_tile(tiles, idx, slots_p[..., p], pattern, q_pos, geometry)
    return scores, values


def _mask_tile(tiles, idx, slot, pattern, q_pos, geometry) -> None:
    """Apply the element rule in place to one tile per (b, h, query block); slot: (B, H, c)."""
    n_slots, bk = tiles.shape[4], tiles.shape[5]
    live = (slot >= 0) & (slot < n_slots)
    if not bool(live.any()):
        return
    slot = slot.clamp(0, n_slots - 1)
    where = slot[:, :, :, None, None, None].expand(*tiles.shape[:4], 1, bk)
    tile = tiles.gather(4, where)  # (B, H, c, rows, 1, Bk)
    block = idx.gather(-1, slot.unsqueeze(-1))  # (B, H, c, 1)
    k_pos = (block * bk + torch.arange(bk, device=idx.device)).unsqueeze(3)  # (B, H, c, 1, Bk)
    allowed = (k_pos < pattern.kv_len) & (block >= 0).unsqueeze(-1)
    if pattern.mask_mod is not None:
        allowed = allowed & pattern.mask_mod(geometry.mod_batch, geometry.mod_head, q_pos, k_pos)
    drop = ~allowed & live[:, :, :, None, None]
    tiles.scatter_(4, where, tile.masked_fill(drop.unsqueeze(4), float("-inf")))


def _online_softmax(qc, k_blocks, v_blocks, pattern, partial, q0, q1, slot_chunk, q_pos, geometry):
    """Softmax over many key slots in chunks, merged with a running max (FlashAttention).

    Returns (out (B, H, c, rows, Dv), lse (B, H, c, rows, 1))."""
    b, heads, c, rows, _ = qc.shape
    dv = v_blocks.shape[-1]
    acc = torch.zeros(b, heads, c, rows, dv, dtype=qc.dtype, device=qc.device)
    row_max = torch.full((b, heads, c, rows, 1), float("-inf"), dtype=qc.dtype, device=qc.device)
    row_sum = torch.zeros(b, heads, c, rows, 1, dtype=qc.dtype, device=qc.device)
    slots = pattern.kv_blocks.shape[-1]
    for s0 in range(0, slots, slot_chunk):
        s1 = min(slots, s0 + slot_chunk)
        scores, values = _tile_scores(qc, k_blocks, v_blocks, pattern, partial, q0, q1, s0, s1, q_pos, geometry)
        new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        probs = scores.sub_(safe_max).exp_()
        rescale = torch.exp(row_max - safe_max)
        row_sum = row_sum * rescale + probs.sum(dim=-1, keepdim=True)
        acc = acc * rescale + torch.matmul(probs, values)
        row_max = new_max
    return acc / row_sum, row_max + row_sum.log()  # 0/0 = NaN (and lse -inf) marks rows without keys


def _check_rows(result, q_valid, q0, bq, group, fold, method) -> None:
    empty = torch.isnan(result[..., :1]) & q_valid
    if bool(empty.any()):
        bb, hh, cc, rr, _ = (int(x) for x in empty.nonzero()[0])
        head = hh * group + rr // bq if fold else hh
        validate.empty_row_error((q0 + cc) * bq + rr % bq, bb, head, method)


def _pad_len(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[2] == length:
        return x.contiguous()
    return F.pad(x, (0, 0, 0, length - x.shape[2]))


def _query_tiles(q: torch.Tensor, nqb: int, bq: int, hkv: int, fold: bool) -> torch.Tensor:
    """(B, Hq, Nq, D) -> (B, heads, nQB, rows, D); fold puts a GQA group's heads in rows."""
    b, hq, _, d = q.shape
    qp = _pad_len(q, nqb * bq)
    if not fold:
        return qp.view(b, hq, nqb, bq, d)
    group = hq // hkv
    tiles = qp.view(b, hkv, group, nqb, bq, d).permute(0, 1, 3, 2, 4, 5)
    return tiles.reshape(b, hkv, nqb, group * bq, d)


def _untile(out: torch.Tensor, b: int, hq: int, hkv: int, nq: int, nqb: int, bq: int, dv: int, fold: bool) -> torch.Tensor:
    if fold:
        group = hq // hkv
        out = out.view(b, hkv, nqb, group, bq, dv).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(b, hq, nqb * bq, dv)[:, :, :nq]


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
