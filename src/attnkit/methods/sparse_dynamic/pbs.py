"""PBS-Attn: permute keys within segments so important keys share blocks, then block-sparse attention.

Paper: Wang et al., "Sparser Block-Sparse Attention via Token Permutation",
arXiv:2510.21270 (2025); reference code github.com/xinghaow99/pbs-attn. Attention is
invariant to a permutation of the keys (and values), so PBS reorders keys to make the
block mask sparser. To keep causality tractable it permutes only *within segments* of
``segment_size`` keys: a query sees whole earlier segments and, causally, part of its own.
Steps (reference ``permuted_block_sparse_attn_fwd``):
1. permutation: score every key by its attention from the last query block (softmax of
   the last ``block_size`` queries over all keys, summed over those queries), and sort the
   keys of each segment by descending score ("vertical" keys gather in the first blocks
   of their segment); values follow the keys;
2. block selection: mean-pooled queries against mean-pooled *permuted* keys give block
   scores; a softmax over the off-diagonal-segment blocks a query block may see and the
   smallest set reaching ``threshold`` of the mass is kept (0.9 in the reference);
3. the query's own segment (all its blocks, causal by original position) and the block
   holding key 0 are always kept;
4. block-sparse attention over permuted keys (no inverse permutation is needed for the
   output, since queries are not permuted).

Here ``stats.pattern`` is the equivalent pattern in the original key order.
Deliberate deviations: defaults block_size 64 / segment_size 256 (the reference uses 128 /
256); non-causal attention (the reference is causal only) keeps the query's own segment
and selects among all other blocks; Nq < Nk is supported (segments are over key
positions; a query tile keeps every segment it overlaps). GQA: keys are permuted per KV
head by the summed scores of the group's query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import validate
from ...kernels.pattern import cdiv
from ...registry import register
from .common import cumulative_mask, gqa_scores, last_query_probs, pool
from .permuted import Permutation, PermutedMethod, lookup, pattern_from_mask


@register(
    "pbs",
    family="dynamic_sparse",
    paper="Sparser Block-Sparse Attention via Token Permutation",
    arxiv="2510.21270",
    year=2025,
)
class PBS(PermutedMethod):
    """Keys sorted within segments by last-block attention, then threshold block selection."""

    @dataclass
    class Config:
        block_size: int = 64
        segment_size: int = 256
        threshold: float = 0.9

    def check_config(self) -> None:
        c = self.config
        validate.check_positive(self.name, block_size=c.block_size, segment_size=c.segment_size)
        if c.segment_size % c.block_size:
            raise ValueError(
                f"segment_size={c.segment_size} of method {self.name!r} must be a multiple of block_size={c.block_size}"
            )
        if not 0.0 < c.threshold <= 1.0:
            raise ValueError(f"threshold of method {self.name!r} must be in (0, 1], got {c.threshold!r}")

    def estimate_permuted(self, q, k, causal, scale):
        c = self.config
        bs, seg = c.block_size, c.segment_size
        b, hq, nq, _ = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        group = hq // hkv
        device = q.device
        off = nk - nq

        # 1. permutation within segments by attention of the last query block.
        probs = last_query_probs(q, k, bs, scale, causal).sum(dim=2)  # (B, Hq, Nk)
        key_score = probs.view(b, hkv, group, nk).sum(dim=2)
        nseg = cdiv(nk, seg)
        padded = F.pad(key_score, (0, nseg * seg - nk), value=-1.0)  # padding sorts last
        order = padded.view(b, hkv, nseg, seg).argsort(dim=-1, descending=True, stable=True)
        perm_k = (order + torch.arange(nseg, device=device).view(1, 1, nseg, 1) * seg).view(b, hkv, nseg * seg)[..., :nk]
        k_perm = torch.gather(k, 2, perm_k.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1]))

        # 2. block selection on pooled queries and pooled permuted keys.
        nqb, nkb = cdiv(nq, bs), cdiv(nk, bs)
        scores = gqa_scores(pool(q.float(), bs, "mean"), pool(k_perm.float(), bs, "mean"), scale)
        q_lo = torch.arange(nqb, device=device) * bs + off
        q_hi = (q_lo + bs - 1).clamp(max=nk - 1 if causal else nq - 1 + off)
        k_seg = (torch.arange(nkb, device=device) * bs) // seg
        own = (k_seg[None, :] >= (q_lo.clamp(0, nk - 1) // seg)[:, None]) & (k_seg[None, :] <= (q_hi.clamp(0, nk - 1) // seg)[:, None])
        candidates = ~own
        if causal:
            candidates = candidates & (k_seg[None, :] < (q_lo // seg)[:, None])
        w = torch.softmax(scores.masked_fill(~candidates, float("-inf")), dim=-1).nan_to_num(0.0)
        keep = cumulative_mask(w, c.threshold) & candidates
        # 3. own segment(s) and the block holding key 0 (slot of key 0 in segment 0).
        first = (perm_k[..., :seg] == 0).float().argmax(-1) // bs  # (B, Hkv)
        keep = keep | own | (torch.arange(nkb, device=device) == first.repeat_interleave(group, 1)[..., None, None])
        if causal:
            keep = keep & (k_seg[None, :] <= (q_hi // seg)[:, None])

        def pbs_rule(bb, h, q_pos, k_pos):
            return lookup(perm_k, bb, h, k_pos, group) <= q_pos

        # Tiles of whole earlier segments need no element rule (and none does when non-causal).
        full = (k_seg[None, :] < (q_lo // seg)[:, None]) & ((torch.arange(nkb, device=device) + 1) * bs <= nk)
        rule = pbs_rule if causal else None
        pattern = pattern_from_mask(keep, bs, bs, nq, nk, mask_mod=rule, full=full if causal else keep)
        return pattern, Permutation(k=perm_k)
