"""Which sequence positions a rank holds: the contiguous and zigzag layouts.

contiguous: the (padded) sequence is cut into R equal chunks, rank r holds chunk r.
zigzag: it is cut into 2R equal chunks, rank r holds chunks r and 2R-1-r (in that
order), so under causal attention every rank has the same amount of work (the layout
of ring-flash-attention's zigzag ring). A length not divisible by the chunk count is
padded at the end by ``shard``; the padded positions are >= the true length, and the
attention functions mask them when given ``total_len``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")


def _chunks(world: int, layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return world if layout == "contiguous" else 2 * world


def padded_len(n: int, world: int, layout: str) -> int:
    """The total length after padding n to a multiple of the layout's chunk count."""
    c = _chunks(world, layout)
    return -(-n // c) * c


def positions(rank: int, world: int, n: int, layout: str = "zigzag") -> torch.Tensor:
    """Global positions (int64, in shard order) that ``rank`` holds of a sequence of
    length n (padded positions, >= n, included)."""
    c = _chunks(world, layout)
    size = padded_len(n, world, layout) // c
    idx = [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]
    return torch.cat([torch.arange(i * size, (i + 1) * size) for i in idx])


def check_same_length(n: int, group=None) -> None:
    """Raise on every rank when the ranks were called with different total lengths."""
    mine = torch.tensor([n], dtype=torch.int64)
    got = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(got, mine, group=group)
    lens = [int(t) for t in got]
    if len(set(lens)) != 1:
        raise ValueError(f"ranks were called with different total lengths {lens} (rank {dist.get_rank(group)}: {n})")


def shard(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's shard of x (the full tensor, e.g. (B, H, N, D) with dim=2).

    Pads ``dim`` with zeros to a multiple of the chunk count (R or 2R); keep the true
    length N to pass as ``total_len`` to the attention functions and ``unshard``.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[dim]
    check_same_length(n, group)
    total = padded_len(n, world, layout)
    if total != n:
        pad = list(x.shape)
        pad[dim] = total - n
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)
    return x.index_select(dim, positions(rank, world, n, layout).to(x.device))


def unshard(x_shard: torch.Tensor, group=None, layout: str = "zigzag", total_len: int | None = None,
            dim: int = 2) -> torch.Tensor:
    """The full tensor from every rank's shard (an all-gather), padding removed.

    x_shard: this rank's shard along ``dim``; total_len: the true length (default: no
    padding). Not differentiable (gather gradients with ``unshard`` as well).
    """
    world = dist.get_world_size(group)
    n_local = x_shard.shape[dim]
    total_len = world * n_local if total_len is None else total_len
    check_same_length(total_len, group)
    if padded_len(total_len, world, layout) != world * n_local:
        raise ValueError(f"a shard of {n_local} positions does not fit total_len={total_len} at {world} ranks ({layout})")
    x_shard = x_shard.contiguous()
    parts = [torch.empty_like(x_shard) for _ in range(world)]
    dist.all_gather(parts, x_shard, group=group)
    full = torch.empty_like(torch.cat(parts, dim=dim))
    index = torch.cat([positions(r, world, total_len, layout) for r in range(world)]).to(x_shard.device)
    full.index_copy_(dim, index, torch.cat(parts, dim=dim))
    return full.narrow(dim, 0, total_len)
