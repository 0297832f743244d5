"""HiP: hierarchical top-k pruning of key chunks per query block.

Paper: Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework
with Hierarchically Pruned Attention" (first version: "HiP Attention: Sparse Sub-Quadratic
Attention with Hierarchical Attention Pruning"), arXiv:2406.09827 (2024). Relying on
"attention locality" (neighbouring keys get similar scores), HiP estimates the top-k keys of
a block of queries with a tree search: split the keys into 2k/b_k chunks, score each chunk
by its representative (centre) key against the query block (max over the block's queries),
keep the k/b_k best chunks, split each of them in two, score, keep the best, ... until the
chunks have b_k keys; the block of queries then attends to exactly those k keys. Cost
O(N k log N) per head, never N x N.

Algorithm here (per batch, KV head, query block of ``block_size`` queries):
1. candidates: causal -> the keys after the first ``sink`` and before the local band of
   the block (never past its first query, so every candidate precedes every query of the
   block); non-causal -> every key after the sink;
2. divide the candidates into 2 topk / chunk contiguous chunks and repeat: score = max
   over the block's queries (of every query head of the group) of q . k_centre
   (k_centre = the key at the centre of the chunk), keep the topk / chunk best chunks,
   halve each kept chunk (a chunk of at most ``chunk`` keys stays whole), until every
   kept chunk has at most ``chunk`` keys — ``topk`` keys in all; a block with at most
   ``topk`` candidates keeps them all;
3. the kept keys of each query block are gathered into their own key slots (a token may
   sit in the slots of many blocks) and the shared block-sparse kernel runs query block i
   against its slots; the anchors — the first ``sink`` keys and the ``local`` keys up to
   each query — run exactly in the original order, and the two parts are merged through
   their log-sum-exps (``PermutedMethod``).

Deliberate deviations: query blocks of 64 (the kernel tile; the paper uses b_q = 32); one
key set per KV head (the scores of a GQA group's query heads are maxed together: one
gather of keys per KV head, within 1-4% of per-query-head sets on SmolLM2); ``sink`` /
``local`` are the reference code's ``sink_token_size`` / ``sliding_window_size`` (it runs
with windows of 128-1024 keys); ``local`` is at least 1 (a query always sees itself).
Defaults: block_size 64, topk 512 (the paper's k), chunk 2 (the paper's b_k), sink 64,
local 256.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import validate
from ...kernels.pattern import cdiv
from ...registry import register
from ._shared_extra import Permutation, PermutedMethod, lookup, pattern_from_mask

# Centre-key gathers of the tree search per step: query blocks are searched in groups
# so that (B, Hkv, blocks, chunks, D) float32 stays near this many elements.
_TREE_ELEMS = 1 << 24


@register(
    "hip",
    family="dynamic_sparse",
    paper="A Training-Free Sub-quadratic Cost Transformer Model Serving Framework with Hierarchically Pruned Attention",
    arxiv="2406.09827",
    year=2024,
)
class HiP(PermutedMethod):
    """Tree search for the top-k keys of each query block, scored by chunk-centre keys."""

    @dataclass
    class Config:
        block_size: int = 64
        topk: int = 512
        chunk: int = 2
        sink: int = 64
        local: int = 256

    def check_config(self) -> None:
        c = self.config
        validate.check_positive(self.name, block_size=c.block_size, topk=c.topk, chunk=c.chunk)
        validate.check_non_negative(self.name, sink=c.sink, local=c.local)
        if c.topk % c.chunk:
            raise ValueError(f"topk of method {self.name!r} must be a multiple of chunk ({c.chunk}): it counts the "
                             f"keys of topk / chunk kept chunks; got topk={c.topk}")

    def anchors(self) -> tuple[int, int]:
        return self.config.sink, max(self.config.local, 1)

    def estimate_permuted(self, q, k, causal, scale):
        c = self.config
        bs = c.block_size
        nq, nk = q.shape[2], k.shape[2]
        sink, local = self.anchors()
        base, count = candidate_ranges(nq, nk, bs, sink, local, causal, q.device)
        tokens, valid = select_keys(q, k, base, count, bs, c.topk, c.chunk, scale)
        pattern, perm = slot_pattern(tokens, valid, nq, nk, bs, q.shape[1] // k.shape[1])
        if causal:
            pattern.full_tiles = clear_slot_tiles(tokens, valid, nq, nk, bs, sink, local)
        return pattern, perm


def candidate_ranges(nq: int, nk: int, block: int, sink: int, local: int, causal: bool, device=None):
    """First candidate key and candidate count of each query block: (int, (nQB,) long).

    Causal: keys [sink, end) with end = min(last query - local + 1, first query) of the
    block, so candidates are outside the band of the block's last query and before every
    query of the block. Non-causal: keys [sink, Nk)."""
    base = min(sink, nk)
    nqb = cdiv(nq, block)
    if not causal:
        return base, torch.full((nqb,), nk - base, dtype=torch.long, device=device)
    first = torch.arange(nqb, device=device) * block + (nk - nq)
    last = (first + block - 1).clamp(max=nk - 1)
    end = torch.minimum(last - local + 1, first)
    return base, (end - base).clamp(min=0)


def select_keys(q, k, base: int, count: torch.Tensor, block: int, topk: int, chunk: int, scale: float):
    """The tree search of every query block -> kept key positions and their validity,
    both (B, Hkv, nQB, S) with S = topk rounded up to a multiple of ``block``."""
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    nqb = cdiv(nq, block)
    slots = cdiv(topk, block) * block
    # Padded query rows repeat the last query, so they never change a block's max score.
    q_pad = torch.cat([q.float(), q[:, :, -1:].float().expand(b, hq, nqb * block - nq, d)], dim=2)
    q_tiles = q_pad.view(b, hkv, group, nqb, block, d).transpose(2, 3).reshape(b, hkv, nqb, group * block, d)
    keys = k.float()
    step = max(1, _TREE_ELEMS // max(1, b * hkv * 2 * (topk // chunk) * d))
    tokens, valid = [], []
    for i in range(0, nqb, step):
        j = min(i + step, nqb)
        lo, hi = tree_search(q_tiles[:, :, i:j], keys, base, count[i:j], topk // chunk, chunk, scale)
        t, ok = _chunk_tokens(lo, hi, chunk, slots)
        # A block with at most topk candidates keeps them all.
        fits = (count[i:j] <= topk).view(1, 1, -1, 1)
        offs = torch.arange(slots, device=q.device)
        fit_ok = offs < count[i:j].view(1, 1, -1, 1)
        t = torch.where(fits, torch.where(fit_ok, base + offs, 0), t)
        ok = torch.where(fits, fit_ok, ok)
        tokens.append(t)
        valid.append(ok)
    return torch.cat(tokens, dim=2), torch.cat(valid, dim=2)


def tree_search(q_tiles, keys, base: int, count: torch.Tensor, keep: int, chunk: int, scale: float):
    """HiP's hierarchical pruning. q_tiles: (B, Hkv, nb, R, D) queries of each block (R =
    group x block rows); keys: (B, Hkv, Nk, D); candidates of
    block i: [base, base + count[i]). Returns the kept chunks' bounds lo, hi (B, Hkv, nb, keep)
    in key positions (empty chunks have hi == lo)."""
    b, hkv, nb = q_tiles.shape[:3]
    i = torch.arange(2 * keep + 1, device=keys.device)
    edges = base + (i * count.view(1, 1, nb, 1)) // (2 * keep)
    lo, hi = edges[..., :-1].expand(b, hkv, nb, 2 * keep), edges[..., 1:].expand(b, hkv, nb, 2 * keep)
    while True:
        score = chunk_scores(q_tiles, keys, lo, hi, scale)
        best = score.topk(min(keep, score.shape[-1]), dim=-1).indices
        lo, hi = lo.gather(-1, best), hi.gather(-1, best)
        if bool(((hi - lo) <= chunk).all()):
            return lo, hi
        mid = torch.where(hi - lo > chunk, (lo + hi + 1) // 2, hi)  # a finished chunk keeps an empty twin
        lo, hi = torch.cat([lo, mid], dim=-1), torch.cat([mid, hi], dim=-1)


def chunk_scores(q_tiles, keys, lo, hi, scale):
    """max over a block's queries of q . k at the centre of each chunk; -inf for empty chunks.

    lo, hi: (B, Hkv, nb, C) chunk bounds in key positions. Returns (B, Hkv, nb, C)."""
    b, hkv, nb, c = lo.shape
    nk, d = keys.shape[2], keys.shape[3]
    centre = ((lo + hi) // 2).clamp(0, nk - 1)
    rep = torch.gather(keys, 2, centre.reshape(b, hkv, nb * c, 1).expand(b, hkv, nb * c, d)).view(b, hkv, nb, c, d)
    s = torch.matmul(q_tiles, rep.transpose(-1, -2)).amax(dim=3) * scale  # (B, Hkv, nb, C)
    return s.masked_fill(hi <= lo, float("-inf"))


def _chunk_tokens(lo, hi, chunk: int, slots: int):
    """Kept chunks -> their keys in ascending order, padded to ``slots``: (B, Hkv, nb, slots)
    positions and validity (padding slots hold a large position and are invalid)."""
    j = torch.arange(chunk, device=lo.device)
    t = lo.unsqueeze(-1) + j
    ok = (t < hi.unsqueeze(-1)).flatten(-2)
    t = t.flatten(-2)
    big = torch.iinfo(torch.long).max
    t = torch.where(ok, t, big).sort(dim=-1).values
    t = torch.cat([t, t.new_full((*t.shape[:-1], slots - t.shape[-1]), big)], dim=-1)
    ok = t != big
    return torch.where(ok, t, 0), ok


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


def clear_slot_tiles(tokens: torch.Tensor, valid: torch.Tensor, nq: int, nk: int, block: int, sink: int,
                     local: int) -> torch.Tensor:
    """Causal slot tiles that need no element rule: (1, 1, nQB, S / block) bool, aligned with
    ``slot_pattern``'s tile lists. A tile is clear when, for every batch and KV head, each of
    its slots holds a kept key outside the sink and outside the local band of the block's
    *first* query (hence of every query of the block). Candidates end at the band of the
    block's last query, so only the last tiles of a block can hold band keys."""
    b, hkv, nqb, slots = tokens.shape
    first = torch.arange(nqb, device=tokens.device) * block + (nk - nq)
    outside = (tokens >= sink) & (tokens <= (first - local).view(1, 1, nqb, 1))
    clear = (valid & outside).view(b, hkv, nqb, slots // block, block).all(dim=-1)
    return clear.all(dim=1, keepdim=True).all(dim=0, keepdim=True)


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
