"""HiP: hierarchical top-k pruning of key chunks per query block.

Paper: Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework
with Hierarchically Pruned Attention" (first version: "HiP Attention: Sparse Sub-Quadratic
Attention with Hierarchical Attention Pruning"), arXiv:2406.09827 (2024). Relying on
"attention locality" (neighbouring keys get similar scores), HiP estimates the top-k keys of
a block of queries with a tree search: split the keys into 2k chunks, score each chunk by
its representative (centre) key against the query block (max over the block's queries),
keep the k best chunks, split each of them in two, score, keep the k best, ... until the
chunks are single key blocks. Cost O(N k log N) per head, never N x N.

Algorithm here (per batch, query head, query block of ``block_size`` queries):
1. candidates: causal -> the key blocks strictly between the first block (or the sink)
   and the local band / diagonal block of the query block (those are always kept);
   non-causal -> all key blocks;
2. divide the candidate keys into 2 topk contiguous chunks and repeat: score = max over
   the block's queries of q . k_centre (k_centre = the key at the centre of the chunk),
   keep the topk best chunks, halve each kept chunk (a chunk of at most ``chunk`` keys
   stays whole), until every kept chunk has at most ``chunk`` keys (the paper's finest
   level: 1-4 tokens);
3. each kept chunk selects the kernel block it lies in (both, if it straddles two), and
   the shared block-sparse kernel runs on those blocks.

Deliberate deviations: the paper's kernel attends to the kept tiny chunks themselves;
here each kept chunk brings in its whole 64-key kernel block (at most topk blocks, 2 topk
when chunks straddle block edges), so the tree finds the keys at the paper's resolution
and the kernel runs on dense tiles. ``chunk=block_size`` stops the tree at whole blocks,
each scored by its centre key. ``sink`` / ``local`` are the reference code's
``sink_token_size`` / ``sliding_window_size`` (it runs with windows of 128-1024 keys):
the first ``sink`` keys (at least the first block) and the tiles of the ``local`` keys up
to each query are always attended, and the tree search runs over the blocks between
them (step 1). Defaults: block_size 64, topk 8 (= 512 keys, the paper's k = 512), chunk
4, sink 0 (the first block is kept anyway), local 256.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import validate
from ...kernels.pattern import cdiv
from ...registry import register
from .common import DynamicMethod, anchor_block_mask, block_pattern, diagonal_block_mask


@register(
    "hip",
    family="dynamic_sparse",
    paper="A Training-Free Sub-quadratic Cost Transformer Model Serving Framework with Hierarchically Pruned Attention",
    arxiv="2406.09827",
    year=2024,
)
class HiP(DynamicMethod):
    """Tree search for the top-k key blocks of each query block, scored by chunk-centre keys."""

    @dataclass
    class Config:
        block_size: int = 64
        topk: int = 8
        sink: int = 0
        local: int = 256
        chunk: int = 4

    def check_config(self) -> None:
        c = self.config
        validate.check_positive(self.name, block_size=c.block_size, topk=c.topk, chunk=c.chunk)
        validate.check_non_negative(self.name, sink=c.sink, local=c.local)

    def estimate(self, q, k, causal, scale):
        c = self.config
        bs, topk = c.block_size, c.topk
        b, hq, nq, d = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        group = hq // hkv
        nqb, nkb = cdiv(nq, bs), cdiv(nk, bs)
        device = q.device
        off = nk - nq

        forced = anchor_block_mask(nq, nk, bs, bs, c.sink, c.local, device)
        if causal:
            forced = forced | diagonal_block_mask(nq, nk, bs, bs, device)
            forced[..., 0] = True
            # Candidate blocks [base, base + count): between the first block / sink and the
            # local band / diagonal block of the query block (those are kept anyway).
            base = cdiv(max(c.sink, bs), bs)
            q_lo = torch.arange(nqb, device=device) * bs + off
            end = torch.minimum(q_lo - max(c.local - 1, 0), (q_lo // bs) * bs) // bs
            count = (end - base).clamp(min=0)
        else:
            base, count = 0, torch.full((nqb,), nkb, device=device, dtype=torch.long)
        count = count.view(1, 1, nqb, 1).expand(b, hq, nqb, 1)

        q_tiles = F.pad(q.float(), (0, 0, 0, nqb * bs - nq)).view(b, hq, nqb, bs, d)
        row_ok = (torch.arange(nqb * bs, device=device) < nq).view(1, 1, nqb, bs, 1)
        keys = k.float().repeat_interleave(group, dim=1) if group > 1 else k.float()

        # Tree search in token units over the candidate keys [base * bs, (base + count) * bs).
        finest = min(c.chunk, bs)
        chunks = 2 * topk
        i = torch.arange(chunks + 1, device=device)
        edges = (i * count * bs) // chunks  # (B, Hq, nQB, 2k+1)
        lo, hi = edges[..., :-1], edges[..., 1:]
        while True:
            score = self._chunk_scores(q_tiles, row_ok, keys, lo, hi, base * bs, scale)
            keep = score.topk(min(topk, score.shape[-1]), dim=-1).indices
            lo, hi = lo.gather(-1, keep), hi.gather(-1, keep)
            if bool(((hi - lo) <= finest).all()):
                break
            mid = torch.where(hi - lo > finest, (lo + hi + 1) // 2, hi)  # a finished chunk keeps an empty twin
            lo, hi = torch.cat([lo, mid], dim=-1), torch.cat([mid, hi], dim=-1)

        # Each kept chunk selects the kernel block(s) it lies in.
        chosen = torch.zeros(b, hq, nqb, nkb + 1, dtype=torch.bool, device=device)
        live = hi > lo
        chosen.scatter_(-1, torch.where(live, lo // bs + base, nkb), True)
        chosen.scatter_(-1, torch.where(live, (hi - 1) // bs + base, nkb), True)
        chosen = chosen[..., :nkb]
        return block_pattern(chosen | forced, bs, bs, nq, nk, causal)

    @staticmethod
    def _chunk_scores(q_tiles, row_ok, keys, lo, hi, base, scale):
        """max over a query block's queries of q . k at the centre of each chunk; -inf for empty chunks.

        lo, hi: (B, Hq, nQB, C) chunk bounds in candidate tokens (key base + offset).
        Returns (B, Hq, nQB, C).
        """
        b, hq, nqb, c = lo.shape
        nk, d = keys.shape[2], keys.shape[3]
        centre = ((lo + hi) // 2 + base).clamp(0, nk - 1)
        rep = torch.gather(keys, 2, centre.view(b, hq, nqb * c, 1).expand(b, hq, nqb * c, d)).view(b, hq, nqb, c, d)
        s = torch.matmul(q_tiles, rep.transpose(-1, -2)) * scale  # (B, Hq, nQB, bs, C)
        s = s.masked_fill(~row_ok, float("-inf")).amax(dim=3)
        return s.masked_fill(hi <= lo, float("-inf"))

