"""Dynamic sparse attention across shards: MInference's vertical-slash on the ring.

Paper: Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
Dynamic Sparse Attention", arXiv:2407.02490 (2024) (the method ``vertical_slash``).

The single-process method estimates, per (batch, query head), its columns and diagonals
from the attention of the last ``last_q`` queries over every key, then attends over
them. Across shards: the rank holding the last query gathers the last ``last_q`` queries
and every key (``dist.gather``: O(N D) to that rank only), runs the method's own
estimator on them (the same rows and keys as one process: the same index), and
broadcasts the index (one flat int64 tensor, after its sizes). Every rank then runs the
ring (``ring.run_ring``) with that index as a static per-head mask of global positions
(``kernels.vertical_slash.to_block_pattern``'s element rule), so the output is the
single-process ``vertical_slash``'s, and so are the gradients (the selection is a
discrete choice, as in one process). Causal only, like the method.

Not yet: the ring masks are dense per step ((B, Hq, n, n) booleans per visiting shard);
steps whose mask is empty for every rank are skipped, but within a step every pair is
computed (the single-process kernel runs only the selected runs and columns).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..kernels.vertical_slash import VerticalSlashIndex, to_block_pattern
from .ring import _peer, run_ring
from .sharding import check_same_length, padded_len, positions


def _gather_rows(x: torch.Tensor, rows: torch.Tensor, dst: int, group, layout: str, total_len: int):
    """The global positions ``rows`` of a sharded x (B, H, n, D), on rank ``dst`` only
    (None elsewhere): one ``dist.gather`` of every shard."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world)] if rank == dst else None
    dist.gather(x, parts, dst=_peer(group, dst), group=group)
    if rank != dst:
        return None
    index = torch.cat([positions(r, world, total_len, layout) for r in range(world)]).to(x.device)
    full = torch.empty_like(torch.cat(parts, dim=2))
    full.index_copy_(2, index, torch.cat(parts, dim=2))
    return full.index_select(2, rows.to(x.device))


def _broadcast_index(index: Optional[VerticalSlashIndex], src: int, group, b: int, h: int, n: int, block: int,
                     device) -> VerticalSlashIndex:
    """The estimating rank's index on every rank: sizes, then one flat int64 tensor."""
    rank = dist.get_rank(group)
    lists = None if rank != src else [t for bb in range(b) for hh in range(h)
                                      for t in (index.verticals[bb][hh], index.slashes[bb][hh])]
    sizes = torch.tensor([t.numel() for t in lists] if lists else [0] * (2 * b * h), dtype=torch.int64)
    dist.broadcast(sizes, _peer(group, src), group=group)
    flat = torch.cat(lists).to(torch.int64).cpu() if lists else torch.empty(int(sizes.sum()), dtype=torch.int64)
    dist.broadcast(flat, _peer(group, src), group=group)
    parts = iter(flat.to(device).split(sizes.tolist()))
    verticals, slashes = [[None] * h for _ in range(b)], [[None] * h for _ in range(b)]
    for bb in range(b):
        for hh in range(h):
            verticals[bb][hh], slashes[bb][hh] = next(parts), next(parts)
    return VerticalSlashIndex(verticals, slashes, block, n, n)


def _per_head_mask(index: VerticalSlashIndex, b: int, h: int):
    """The index's allowed set as a mask_mod of global positions: (B, Hq, Nq, Nk)."""
    rule = to_block_pattern(index).mask_mod
    bb = torch.arange(b)[:, None, None, None]
    hh = torch.arange(h)[None, :, None, None]

    def mask_mod(_b, _h, q_pos, k_pos):
        return rule(bb.to(q_pos.device), hh.to(q_pos.device), q_pos[None, None], k_pos[None, None])

    return mask_mod


def vertical_slash_ring(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    layout: str = "zigzag",
    scale: Optional[float] = None,
    total_len: Optional[int] = None,
    return_index: bool = False,
    **config,
):
    """Context-parallel ``vertical_slash`` (causal): the index estimated once, the ring
    run under it.

    q: (B, Hq, n, D); k, v: (B, Hkv, n, D / Dv): this rank's shards (``shard(x, group,
    layout)``), the same n on every rank. total_len: the true length (default R * n).
    config: ``vertical_slash``'s fields (vertical_size, slash_size, last_q, sink, local).
    Returns out (B, Hq, n, Dv), this rank's shard, then the ``VerticalSlashIndex``
    (global positions, the same on every rank) when ``return_index``. Differentiable in
    q, k, v (exact, over the selected pattern).
    """
    from ..api import get

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    b, hq, n = q.shape[:3]
    total_len = world * n if total_len is None else total_len
    check_same_length(total_len, group)
    if padded_len(total_len, world, layout) != world * n:
        raise ValueError(f"a shard of {n} positions does not fit total_len={total_len} at {world} ranks ({layout})")
    m = get("vertical_slash", **config)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    last = min(m.config.last_q, total_len)
    owner = next(r for r in range(world) if bool((positions(r, world, total_len, layout) == total_len - 1).any()))
    rows = torch.arange(total_len - last, total_len)
    q_last = _gather_rows(q, rows, owner, group, layout, total_len)
    k_all = _gather_rows(k, torch.arange(total_len), owner, group, layout, total_len)
    index = None
    if rank == owner:
        with torch.no_grad():  # the estimator reads only the last queries' rows: the same as one process
            index = m.estimate(q_last, k_all, True, scale)
    block = index.block if index is not None else 0
    block_t = torch.tensor([block], dtype=torch.int64)
    dist.broadcast(block_t, _peer(group, owner), group=group)
    index = _broadcast_index(index, owner, group, b, hq, total_len, int(block_t), q.device)
    out, _, _ = run_ring(q, k, v, group, True, layout, scale, total_len, _per_head_mask(index, b, hq))
    return (out, index) if return_index else out
