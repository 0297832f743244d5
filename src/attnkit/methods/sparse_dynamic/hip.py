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
3. each query block attends to exactly its kept keys (gathered per group of blocks, a
   token may serve many blocks); the anchors — the first ``sink`` keys and the ``local`` keys up to
   each query — run exactly in the original order, and the two parts are merged through
   their log-sum-exps (``KeySlotMethod`` in ``key_slots.py``, shared with ``sea``).

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
from ...registry import register
from .key_slots import KeySlotMethod


@register(
    "hip",
    family="dynamic_sparse",
    paper="A Training-Free Sub-quadratic Cost Transformer Model Serving Framework with Hierarchically Pruned Attention",
    arxiv="2406.09827",
    year=2024,
)
class HiP(KeySlotMethod):
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

    def pick_chunks(self, state, q_tiles, keys, first_block, base, count, scale):
        return tree_search(q_tiles, keys, base, count, self.config.topk // self.config.chunk, self.config.chunk, scale)


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
