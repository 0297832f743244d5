"""Key-slot methods (``hip``, ``sea``): each query block attends to its own ``topk`` keys.

A key-slot method picks, per batch, KV head and query block of ``block_size`` queries,
``topk / chunk`` chunks of at most ``chunk`` consecutive keys among the block's
*candidates*, and attends to exactly those keys beside the anchors (the first ``sink``
keys and a band of ``local`` keys up to each query, computed exactly and merged by
log-sum-exp, ``PermutedMethod``). Query block i owns key slots [i S, (i + 1) S), S =
``topk`` rounded up to a multiple of ``block_size`` (a token may sit in the slots of many
blocks): ``slot_pattern`` describes that as a permuted block pattern (stats, recall),
and ``slot_attention`` computes it, gathering the kept keys of one group of blocks at a
time (K and V are never copied S / block_size times at once).

A subclass only decides *which* chunks: ``pick_chunks`` returns their bounds. Candidates
(``candidate_ranges``): causal -> keys [sink, end) with end = min(last query - local + 1,
first query) of the block (outside the band of its last query, before all its queries);
non-causal -> every key after the sink. A block with at most ``topk`` candidates keeps
them all.
"""

from __future__ import annotations

from typing import Any

import torch

from ...kernels.pattern import cdiv
from ._shared_extra import (
    Permutation,
    PermutedMethod,
    anchor_rule,
    lookup,
    pattern_from_mask,
)

# Query blocks are processed in groups so that (B, Hkv, blocks, chunks, D) float32 of a
# group stays near this many elements.
GROUP_ELEMS = 1 << 24


class KeySlotMethod(PermutedMethod):
    """Base of hip and sea. Config fields used: block_size, topk, chunk, sink, local."""

    def anchors(self) -> tuple[int, int]:
        return self.config.sink, max(self.config.local, 1)

    def prepare(self, q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> Any:
        """Per-call state handed to every ``pick_chunks`` call (e.g. key features)."""
        return None

    def pick_chunks(self, state: Any, q_tiles: torch.Tensor, keys: torch.Tensor, first_block: int, base: int,
                    count: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunks kept for a group of query blocks.

        q_tiles: (B, Hkv, nb, R, D) float32 queries of blocks first_block .. first_block +
        nb - 1 (R = group x block rows, query head major; padded rows repeat the last
        query); keys: (B, Hkv, Nk, D) float32; candidates of block i: [base, base +
        count[i]). Returns lo, hi (B, Hkv, nb, topk / chunk) chunk bounds in key positions,
        hi - lo <= chunk (hi == lo: an empty chunk)."""
        raise NotImplementedError

    def group_width(self, nk: int) -> int:
        """Chunks scored per query block at once, of Nk keys (sets how many blocks form a group)."""
        return 2 * (self.config.topk // self.config.chunk)

    def estimate_permuted(self, q, k, causal, scale):
        c = self.config
        bs = c.block_size
        nq, nk = q.shape[2], k.shape[2]
        sink, local = self.anchors()
        base, count = candidate_ranges(nq, nk, bs, sink, local, causal, q.device)
        state = self.prepare(q, k, causal, scale)
        q_tiles = query_tiles(q, k.shape[1], bs)
        keys = k.float()
        b, hkv, nqb, _, d = q_tiles.shape
        step = max(1, GROUP_ELEMS // max(1, b * hkv * self.group_width(nk) * d))
        slots = cdiv(c.topk, bs) * bs
        tokens, valid = [], []
        for i in range(0, nqb, step):
            j = min(i + step, nqb)
            lo, hi = self.pick_chunks(state, q_tiles[:, :, i:j], keys, i, base, count[i:j], scale)
            t, ok = keep_all_that_fit(*chunk_tokens(lo, hi, c.chunk, slots), base, count[i:j], c.topk)
            tokens.append(t)
            valid.append(ok)
        tokens, valid = torch.cat(tokens, dim=2), torch.cat(valid, dim=2)
        pattern, perm = slot_pattern(tokens, valid, nq, nk, bs, q.shape[1] // k.shape[1])
        perm.slots = (tokens, valid)
        return pattern, perm

    def attend_permuted(self, q, k, v, pattern, perm, scale, causal):
        """Each query block against its own kept keys, gathered per group of blocks (never all
        slots at once), anchor pairs excluded: (out (B, Hq, Nq, Dv), lse (B, Hq, Nq))."""
        tokens, valid = perm.slots
        sink, local = self.anchors()
        return slot_attention(q, k, v, tokens, valid, self.config.block_size, scale, anchor_rule(sink, local, causal))


def slot_attention(q, k, v, tokens: torch.Tensor, valid: torch.Tensor, block: int, scale: float, anchored):
    """Softmax partial result of query block i over its kept keys ``tokens[..., i, :]``.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D); tokens, valid: (B, Hkv, nQB, S); ``anchored(b,
    h, q_pos, k_pos)`` marks pairs left to the exact anchor part. Returns out (B, Hq, Nq, Dv)
    (zero where a row keeps nothing) and lse (B, Hq, Nq) (-inf there). Blocks are processed in
    groups so that the gathered keys stay near ``GROUP_ELEMS`` elements."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    group, nqb, slots = hq // hkv, tokens.shape[2], tokens.shape[3]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_tiles = query_tiles(q, hkv, block).to(compute)  # (B, Hkv, nQB, R, D)
    rows = q_tiles.shape[3]
    row_pos = (torch.arange(rows, device=q.device) % block).view(1, -1)  # query offset in its block
    out = torch.empty(b, hkv, nqb, rows, dv, dtype=compute, device=q.device)
    lse = torch.empty(b, hkv, nqb, rows, dtype=compute, device=q.device)
    step = max(1, (GROUP_ELEMS // 4) // max(1, b * hkv * slots * max(d, rows)))  # scores and probs of a group
    k_c, v_c = k.to(compute), v.to(compute)  # once, not per group
    bb = torch.arange(b, device=q.device).view(b, 1, 1, 1, 1)
    hh = torch.arange(hkv, device=q.device).view(1, hkv, 1, 1, 1) * group  # any query head of the KV head
    for i in range(0, nqb, step):
        j = min(i + step, nqb)
        t = tokens[:, :, i:j]
        keys = torch.gather(k_c, 2, t.reshape(b, hkv, -1, 1).expand(-1, -1, -1, d)).view(b, hkv, j - i, slots, d)
        vals = torch.gather(v_c, 2, t.reshape(b, hkv, -1, 1).expand(-1, -1, -1, dv)).view(b, hkv, j - i, slots, dv)
        scores = torch.matmul(q_tiles[:, :, i:j], keys.transpose(-1, -2)) * scale  # (B, Hkv, nb, R, S)
        q_pos = ((torch.arange(i, j, device=q.device) * block).view(-1, 1) + row_pos).clamp(max=nq - 1) + (nk - nq)
        keep = valid[:, :, i:j].unsqueeze(3) & ~anchored(bb, hh, q_pos.view(1, 1, j - i, rows, 1), t.unsqueeze(3))
        scores = scores.masked_fill(~keep, float("-inf"))
        part_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - torch.where(torch.isinf(part_lse), 0.0, part_lse).unsqueeze(-1))
        out[:, :, i:j] = torch.matmul(probs, vals)
        lse[:, :, i:j] = part_lse
    return _untile_rows(out, q.shape, group, block).to(q.dtype), _untile_rows(lse.unsqueeze(-1), q.shape, group, block)[..., 0]


def _untile_rows(x: torch.Tensor, q_shape, group: int, block: int) -> torch.Tensor:
    """(B, Hkv, nQB, group x block, C) rows (query head major) -> (B, Hq, Nq, C)."""
    b, hq, nq, _ = q_shape
    hkv, nqb, c = x.shape[1], x.shape[2], x.shape[-1]
    x = x.view(b, hkv, nqb, group, block, c).transpose(2, 3).reshape(b, hq, nqb * block, c)
    return x[:, :, :nq]


def candidate_ranges(nq: int, nk: int, block: int, sink: int, local: int, causal: bool, device=None):
    """First candidate key and candidate count of each query block: (int, (nQB,) long)."""
    base = min(sink, nk)
    nqb = cdiv(nq, block)
    if not causal:
        return base, torch.full((nqb,), nk - base, dtype=torch.long, device=device)
    first = torch.arange(nqb, device=device) * block + (nk - nq)
    last = (first + block - 1).clamp(max=nk - 1)
    end = torch.minimum(last - local + 1, first)
    return base, (end - base).clamp(min=0)


def query_tiles(q: torch.Tensor, hkv: int, block: int) -> torch.Tensor:
    """q: (B, Hq, Nq, D) -> (B, Hkv, nQB, group x block, D) float32, the rows of a KV head's
    query heads per block (head major). Padded rows repeat the last query."""
    b, hq, nq, d = q.shape
    group, nqb = hq // hkv, cdiv(nq, block)
    q_pad = torch.cat([q.float(), q[:, :, -1:].float().expand(b, hq, nqb * block - nq, d)], dim=2)
    return q_pad.view(b, hkv, group, nqb, block, d).transpose(2, 3).reshape(b, hkv, nqb, group * block, d)


def chunk_tokens(lo: torch.Tensor, hi: torch.Tensor, chunk: int, slots: int):
    """Kept chunks -> their keys in ascending order, padded to ``slots``: (B, Hkv, nb, slots)
    positions and validity (padding slots hold position 0 and are invalid)."""
    j = torch.arange(chunk, device=lo.device)
    t = lo.unsqueeze(-1) + j
    ok = (t < hi.unsqueeze(-1)).flatten(-2)
    t = t.flatten(-2)
    big = torch.iinfo(torch.long).max
    t = torch.where(ok, t, big).sort(dim=-1).values
    t = torch.cat([t, t.new_full((*t.shape[:-1], slots - t.shape[-1]), big)], dim=-1)
    ok = t != big
    return torch.where(ok, t, 0), ok


def keep_all_that_fit(tokens: torch.Tensor, valid: torch.Tensor, base: int, count: torch.Tensor, topk: int):
    """Blocks with at most ``topk`` candidates keep them all (replacing their picks)."""
    slots = tokens.shape[-1]
    fits = (count <= topk).view(1, 1, -1, 1)
    offs = torch.arange(slots, device=tokens.device)
    fit_ok = offs < count.view(1, 1, -1, 1)
    return torch.where(fits, torch.where(fit_ok, base + offs, 0), tokens), torch.where(fits, fit_ok, valid)


def slot_pattern(tokens: torch.Tensor, valid: torch.Tensor, nq: int, nk: int, block: int, group: int):
    """Query block i against its own key slots [i S, (i + 1) S).

    tokens, valid: (B, Hkv, nQB, S) kept key positions of each block. Returns the
    permuted-order BlockPattern (slot validity as element rule) and its Permutation."""
    b, hkv, nqb, slots = tokens.shape
    per = slots // block
    tiles = (torch.arange(nqb, device=tokens.device)[:, None] * per + torch.arange(per, device=tokens.device))
    mask = torch.zeros(1, 1, nqb, nqb * per, dtype=torch.bool, device=tokens.device)
    mask[0, 0].scatter_(-1, tiles, True)
    flat_ok = valid.reshape(b, hkv, nqb * slots)

    def kept_slot(bb, h, q_pos, k_pos):
        return lookup(flat_ok, bb, h, k_pos, group)

    pattern = pattern_from_mask(mask, block, block, nq, nqb * slots, mask_mod=kept_slot)
    rule = _original_rule(tokens, valid, nq, nk, block, group)
    return pattern, Permutation(k=tokens.reshape(b, hkv, nqb * slots), kv_len=nk, rule=rule)


def _original_rule(tokens, valid, nq, nk, block, group):
    """"Key kept for the query's block" in the original order (stats only); builds a
    (B, Hkv, nQB, Nk) bool table on first use."""
    b, hkv, nqb, _ = tokens.shape
    off = nk - nq
    table: list[torch.Tensor] = []

    def kept(bb, h, q_pos, k_pos):
        if not table:
            member = torch.zeros(b, hkv, nqb, nk + 1, dtype=torch.bool, device=tokens.device)
            member.scatter_(-1, torch.where(valid, tokens, nk), True)
            table.append(member[..., :nk])
        q_blk = ((q_pos - off) // block).clamp(0, nqb - 1)
        return table[0][bb % b, (h // group) % hkv, q_blk, k_pos.clamp(0, nk - 1)]

    return kept
