"""Ulysses (DeepSpeed-Ulysses) context parallelism: all-to-all from sequence to head
sharding, attention over the whole sequence for H/R heads, all-to-all back.

Input shards use the contiguous layout (``shard(x, group, "contiguous")``). Query heads
that R does not divide are padded with zero heads (dropped afterwards). K/V heads: when
R divides both Hq and Hkv, rank j takes KV heads j*Hkv/R... with its query heads (the
GQA groups stay together); otherwise (fewer KV heads than ranks, e.g. Gemma 3's single
KV head, or padded query heads) each query head's KV head is replicated before the
exchange, as DeepSpeed-Ulysses and yunchang do. The local attention is any attnkit
method (``ak.attention``) over the true sequence (padding cut off), so the result is
the single-process one. Differentiable: the all-to-all is an autograd.Function whose
backward is the reverse all-to-all.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .sharding import check_same_length, padded_len


def _seq_to_heads(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """(B, H, n, D) sequence shard -> (B, H/R, R*n, D) head shard (H divisible by R)."""
    b, h, n, d = x.shape
    send = x.reshape(b, world, h // world, n, d).transpose(0, 1).contiguous()  # chunk j -> rank j
    recv = torch.empty_like(send)  # chunk j <- rank j's sequence shard of my heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * n, d)


def _heads_to_seq(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """(B, h, R*n, D) head shard -> (B, R*h, n, D) sequence shard."""
    b, h, nn, d = x.shape
    n = nn // world
    send = x.reshape(b, h, world, n, d).permute(2, 0, 1, 3, 4).contiguous()  # seq chunk j -> rank j
    recv = torch.empty_like(send)  # chunk j <- rank j's heads of my sequence chunk
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(b, world * h, n, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _seq_to_heads(x, group, world)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g.contiguous(), ctx.group, ctx.world), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _heads_to_seq(x, group, world)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g.contiguous(), ctx.group, ctx.world), None, None


def _pad_heads(x: torch.Tensor, h: int) -> torch.Tensor:
    return x if x.shape[1] == h else torch.cat([x, x.new_zeros(x.shape[0], h - x.shape[1], *x.shape[2:])], dim=1)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    method: str = "full",
    causal: bool = True,
    scale: Optional[float] = None,
    total_len: Optional[int] = None,
    return_stats: bool = False,
    **config,
):
    """Context-parallel attention by head sharding.

    q: (B, Hq, n, D); k, v: (B, Hkv, n, D / Dv): this rank's contiguous sequence shards
    (the same n on every rank), Hq % Hkv == 0. total_len: the true length before
    ``shard`` padded it (default R * n). method / config: any ``ak.attention`` method.
    Returns out (B, Hq, n, Dv), this rank's sequence shard, and with ``return_stats`` a
    dict: ``bytes_sent`` per rank (forward: (R-1)/R of each all-to-all's input, q, k, v
    in and out back) and, for ``method="full"``, ``score_pairs`` (the query-key score
    entries this rank computes: batch x its Hq'/R heads x the allowed pairs of the whole
    sequence). Differentiable in q, k, v.
    """
    from ..api import attention

    world = dist.get_world_size(group)
    b, hq, n, _ = q.shape
    hkv = k.shape[1]
    total_len = world * n if total_len is None else total_len
    check_same_length(total_len, group)
    if padded_len(total_len, world, "contiguous") != world * n:
        raise ValueError(f"a shard of {n} positions does not fit total_len={total_len} at {world} ranks (contiguous)")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    hq_pad = -(-hq // world) * world
    if hq_pad != hq or hkv % world:  # replicate each query head's KV head
        k, v = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
        k, v = _pad_heads(k, hq_pad), _pad_heads(v, hq_pad)
    q = _pad_heads(q, hq_pad)
    qh, kh, vh = (_SeqToHeads.apply(t, group, world)[:, :, :total_len] for t in (q, k, v))
    out = attention(qh, kh, vh, method=method, causal=causal, scale=scale, **config)
    if total_len != world * n:
        out = torch.cat([out, out.new_zeros(b, out.shape[1], world * n - total_len, out.shape[3])], dim=2)
    res = _HeadsToSeq.apply(out.contiguous(), group, world)[:, :hq]
    if not return_stats:
        return res
    sent = sum(t.numel() * t.element_size() for t in (q, k, v, out)) * (world - 1) // world
    stats = {"bytes_sent": sent}
    if method == "full":
        pairs = total_len * (total_len + 1) // 2 if causal else total_len * total_len
        stats["score_pairs"] = b * (hq_pad // world) * pairs
    return res, stats
