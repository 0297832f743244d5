"""Key-slot methods (``hip``, ``sea``): each query block attends to its own ``topk`` keys.

A key-slot method picks, per batch, KV head and query block of ``block_size`` queries,
``topk / chunk`` chunks of at most ``chunk`` consecutive keys among the block's
*candidates*, and attends to exactly those keys beside the anchors (the first ``sink``
keys and a band of ``local`` keys up to each query, computed exactly and merged by
log-sum-exp, ``PermutedMethod``). The kept keys are a ``kernels.slots.KeySlots`` pattern
(S = ``topk`` rounded up to a multiple of ``block_size`` slots per block, a token may sit
in the slots of many blocks), run by the ``slots`` kernel, which gathers the kept keys of
one group of blocks at a time (K and V are never copied S / block_size times at once),
or by any block backend through its exact original-order pattern.

A subclass only decides *which* chunks: ``pick_chunks`` returns their bounds. Candidates
(``candidate_ranges``): causal -> keys [sink, end) with end = min(last query - local + 1,
first query) of the block (outside the band of its last query, before all its queries);
non-causal -> every key after the sink. A block with at most ``topk`` candidates keeps
them all.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ...kernels import run
from ...kernels.pattern import cdiv
from ...kernels.slots import KeySlots
from .permuted import PermutedMethod, anchor_rule

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
        return KeySlots(torch.cat(tokens, dim=2), torch.cat(valid, dim=2), bs, nq, nk), None

    def anchor_block(self, pattern) -> int:
        return pattern.block

    def exclude_anchors(self, pattern, perm, sink, local, causal, group, kv_len):
        return replace(pattern, exclude=anchor_rule(sink, local, causal))

    def attend_permuted(self, q, k, v, pattern, perm, scale, backend, want_lse):
        """Each query block against its own kept keys (anchor pairs excluded), in the
        original order, on the ``slots`` kernel (or any block backend)."""
        return run(pattern, q, k, v, scale, backend, return_lse=want_lse, method=self.name)

    def main_pairs(self, pattern, batch, heads):
        return pattern.count_pairs(heads)

    def main_in_original_order(self, pattern, perm, group, kv_len):
        return pattern.to_block_pattern(group * pattern.tokens.shape[1])


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
