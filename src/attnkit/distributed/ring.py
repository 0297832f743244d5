"""Ring attention: K/V shards travel the ranks, partial results merge by log-sum-exp.

Each rank holds a sequence shard of q, k, v (``shard``: contiguous or zigzag layout).
At step s rank r attends its queries over the K/V shard of rank r - s (exact attention
with its lse, ``kernels.exact.attention_with_lse``, under a mask built from the GLOBAL
positions of both shards: causality, the padding past ``total_len`` and, for a static
sparse method, its ``mask_mod``), while that shard is already being passed on to rank
r + 1 (``batch_isend_irecv``). The R partial results merge with ``merge_partials``.
A step whose mask is empty is skipped; within a step, zigzag attends per pair of
chunks (2 x 2) and skips the pairs fully masked (under causal, the future); pairs under
plain causality are classified from their start positions (``_Geometry.pair``: no
(n, n) mask), only padding and static patterns build one; a static pattern that no rank needs past step S stops the ring there and
saves (R - 1 - S) shard transfers per rank (``return_stats``).

Backward runs the ring again (an ``autograd.Function``): each step recomputes the
partial attention with autograd on the local q and the visiting k, v, back-propagates
the merged output's gradient through the merge weights exp(lse_i - lse), accumulates
dq locally, and sends the visiting shard's dk, dv along with it, so after R shifts each
owner holds its own. Exact gradients; memory per rank is one shard of K/V (+ its
gradient) in flight, never the whole sequence.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

from ..kernels.exact import attention_with_lse
from ..kernels.merge import merge_partials
from .sharding import check_same_length, padded_len, positions

log = logging.getLogger(__name__)


def _peer(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


def _shift(tensors: list[torch.Tensor], group, rank: int, world: int):
    """Start sending ``tensors`` to rank + 1 and receiving the same shapes from rank - 1.
    Returns (requests, receive buffers)."""
    nxt, prv = _peer(group, (rank + 1) % world), _peer(group, (rank - 1) % world)
    bufs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]  # irecv needs contiguous
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, b, prv, group) for b in bufs]
    return dist.batch_isend_irecv(ops), bufs


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


class _Geometry:
    """Global positions of every rank's shard and how each pair of layout chunks (query
    rank's chunk i, key rank's chunk j) sees each other. A chunk is a run of consecutive
    positions, so under plain causality (no ``mask_mod``) and without padded keys a pair
    is classified from its two start positions (nothing, every pair, or the same run:
    the kernel's own causal rule) with no (n, n) mask built; padded keys and static
    patterns build the pair's boolean mask."""

    def __init__(self, world, n_local, total_len, layout, causal, mask_mod, device):
        self.world, self.causal, self.mask_mod, self.total = world, causal, mask_mod, total_len
        self.chunks = 1 if layout == "contiguous" else 2
        self.pos = [positions(r, world, total_len, layout).to(device) for r in range(world)]
        assert self.pos[0].numel() == n_local
        self.size = n_local // self.chunks
        self.starts = [[int(p[i * self.size]) for i in range(self.chunks)] for p in self.pos]

    def rows(self, i: int) -> slice:
        return slice(i * self.size, (i + 1) * self.size)

    def pair(self, q_rank: int, i: int, k_rank: int, j: int) -> tuple[str, Optional[torch.Tensor]]:
        """("none" | "all" | "causal" | "mask", the bool mask (True = may attend) for "mask")."""
        n, qa, ka = self.size, self.starts[q_rank][i], self.starts[k_rank][j]
        if self.mask_mod is None and ka + n <= self.total:  # no padded key in this chunk
            if not self.causal or ka + n - 1 <= qa:
                return "all", None
            if ka > qa + n - 1:
                return "none", None
            if ka == qa:
                return "causal", None
        m = self._mask(self.pos[q_rank][self.rows(i)], self.pos[k_rank][self.rows(j)])
        if not bool(m.any()):
            return "none", None
        return ("all", None) if bool(m.all()) else ("mask", m)

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(Nq, Nk) bool, or (B, Hq, Nq, Nk) for a per-head ``mask_mod``."""
        qp, kp = q_pos[:, None], k_pos[None, :]
        allowed = (kp < self.total).expand(qp.shape[0], -1)
        if self.causal:
            allowed = allowed & (kp <= qp)
        if self.mask_mod is not None:
            zero = torch.zeros((), dtype=torch.int64, device=qp.device)
            allowed = allowed & self.mask_mod(zero, zero, qp, kp)
        return allowed

    def pairs(self, q_rank: int, k_rank: int) -> list[tuple[int, int, str, Optional[torch.Tensor]]]:
        """The chunk pairs of a step that attend anything: (i, j, kind, mask)."""
        return [(i, j, kind, m) for i in range(self.chunks) for j in range(self.chunks)
                for kind, m in [self.pair(q_rank, i, k_rank, j)] if kind != "none"]

    def needed(self, q_rank: int, k_rank: int) -> bool:
        return any(self.pair(q_rank, i, k_rank, j)[0] != "none" for i in range(self.chunks) for j in range(self.chunks))

    def score_pairs(self, q_rank: int, k_rank: int, batch: int, q_heads: int) -> int:
        """Query-key score entries this step computes: batch x query heads x allowed pairs
        (a per-head mask counts its own pairs)."""
        n, total = self.size, 0
        for _, _, kind, m in self.pairs(q_rank, k_rank):
            if kind == "all":
                total += batch * q_heads * n * n
            elif kind == "causal":
                total += batch * q_heads * n * (n + 1) // 2
            else:
                total += int(m.sum()) * (batch * q_heads if m.dim() == 2 else 1)
        return total


def _empty(q, v):
    """(out 0, lse -inf) of rows without a key."""
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_zeros(*q.shape[:3], v.shape[-1]),
            torch.full(q.shape[:3], float("-inf"), dtype=lse_dtype, device=q.device))


def _partial(q, k, v, scale, geo: _Geometry, pairs: list):
    """(out, lse) of the local queries over a visiting shard: one fused call per pair of
    layout chunks that attends anything (``geo.pairs``; zigzag: up to 2 x 2, the future
    skipped under causal), merged per query chunk."""
    outs, lses = [], []
    for i in range(geo.chunks):
        rows = geo.rows(i)
        parts = [attention_with_lse(q[:, :, rows], k[:, :, geo.rows(j)], v[:, :, geo.rows(j)], scale,
                                    causal=kind == "causal", mask=m)
                 for pi, j, kind, m in pairs if pi == i]
        o, lse = (parts[0] if len(parts) == 1 else merge_partials(parts)) if parts else _empty(q[:, :, rows], v)
        outs.append(o)
        lses.append(lse)
    return (outs[0], lses[0]) if geo.chunks == 1 else (torch.cat(outs, dim=2), torch.cat(lses, dim=2))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, geo, steps, scale):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts, cur = [], [k, v]
        for s in range(steps):
            if s < steps - 1:
                reqs, nxt = _shift(cur, group, rank, world)
            owner = (rank - s) % world
            pairs = geo.pairs(rank, owner)
            if pairs:
                parts.append(_partial(q, cur[0], cur[1], scale, geo, pairs))
            if s < steps - 1:
                _wait(reqs)
                cur = nxt
        if not parts:  # every query of this rank is padding no key may serve
            parts.append(_empty(q, v))
        out, lse = merge_partials(parts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.geo, ctx.steps, ctx.scale = group, geo, steps, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        group, geo, steps, scale = ctx.group, ctx.geo, ctx.steps, ctx.scale
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        cur = [k, v]
        grads = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
        d_out = d_out.to(acc)
        for s in range(steps):
            if s < steps - 1:
                reqs, nxt = _shift(cur, group, rank, world)
            owner = (rank - s) % world
            pairs = geo.pairs(rank, owner)
            if pairs:
                with torch.enable_grad():
                    qd, kd, vd = (t.detach().requires_grad_() for t in (q, cur[0], cur[1]))
                    o_i, lse_i = _partial(qd, kd, vd, scale, geo, pairs)
                    w = torch.where(torch.isneginf(lse_i) | torch.isneginf(lse), 0.0,
                                    torch.exp(lse_i.to(acc) - lse.to(acc)))
                    g_out = w.unsqueeze(-1) * d_out
                    g_lse = w * (d_out * (o_i.detach().to(acc) - out.to(acc))).sum(-1)
                    gq, gk, gv = torch.autograd.grad((o_i, lse_i), (qd, kd, vd),
                                                     (g_out.to(o_i.dtype), g_lse.to(lse_i.dtype)))
                dq += gq
                grads[0] += gk
                grads[1] += gv
            if s < steps - 1:
                _wait(reqs)
                cur = nxt
            # the gradient travels with its shard; the last shift brings it home
            greqs, gnext = _shift(grads, group, rank, world)
            _wait(greqs)
            grads = gnext
        # a ring cut short (static pattern): the gradients are steps shifts from home
        if steps < world:
            for _ in range(world - steps):
                greqs, gnext = _shift(grads, group, rank, world)
                _wait(greqs)
                grads = gnext
        return dq.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None, None, None


def _mask_mod(method: str, causal: bool, total_len: int, config: dict):
    if method == "full":
        if config:
            raise TypeError(f"method 'full' takes no config, got {sorted(config)}")
        return None
    from ..api import get

    m = get(method, **config)
    if not hasattr(m, "mask_mod"):
        raise ValueError(f"ring_attention runs 'full' and static sparse methods with a mask_mod; {method!r} has none "
                         "(use ulysses_attention for any method)")
    return m.mask_mod(causal, kv_len=total_len)


def run_ring(q, k, v, group, causal: bool, layout: str, scale: float, total_len: int, mask_mod,
             every_step: bool = False, count_pairs: bool = False):
    """The ring on checked shards under ``mask_mod(b, h, q_pos, k_pos)`` of global positions
    (None: causality and padding only; it may return (Nq, Nk) or, for a per-head pattern,
    (B, Hq, Nq, Nk)). Returns out, lse and the stats dict of ``ring_attention``."""
    world = dist.get_world_size(group)
    geo = _Geometry(world, q.shape[2], total_len, layout, causal, mask_mod, q.device)
    # the ring stops after the last step any rank needs (the same on every rank)
    steps = world if every_step else 1 + max(
        (s for r in range(world) for s in range(world) if geo.needed(r, (r - s) % world)), default=0)
    out, lse = _RingAttention.apply(q, k, v, group, geo, steps, scale)
    shard_bytes = k.numel() * k.element_size() + v.numel() * v.element_size()
    rank = dist.get_rank(group)
    stats = {"steps": steps, "transfers": steps - 1, "transfers_skipped": world - steps,
             "bytes_sent": (steps - 1) * shard_bytes, "bytes_saved": (world - steps) * shard_bytes}
    if count_pairs:  # the compute counter: score entries this rank computed (forward)
        stats["score_pairs"] = sum(geo.score_pairs(rank, (rank - s) % world, q.shape[0], q.shape[1])
                                   for s in range(steps))
    return out, lse, stats


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    method: str = "full",
    causal: bool = True,
    layout: str = "zigzag",
    scale: Optional[float] = None,
    total_len: Optional[int] = None,
    return_lse: bool = False,
    return_stats: bool = False,
    **config,
):
    """Context-parallel attention of this rank's query shard over every rank's K/V shard.

    q: (B, Hq, n, D); k, v: (B, Hkv, n, D / Dv): this rank's shards (``shard(x, group,
    layout)``), the same n on every rank; Hq % Hkv == 0. total_len: the true sequence
    length before ``shard`` padded it (default R * n, no padding); padded keys are masked.
    method: "full" or a static sparse method with a ``mask_mod`` (sliding_window,
    streaming, ...; its config as keyword arguments), masked by global positions.
    Returns out (B, Hq, n, Dv) (this rank's shard, in shard order), then lse (B, Hq, n)
    when ``return_lse`` (not differentiable), then a stats dict when ``return_stats``:
    steps run, shard transfers skipped, bytes sent / saved per rank (forward) and
    ``score_pairs``, the query-key score entries this rank computed (batch x query heads
    x allowed pairs: its compute, the formulas in docs/distributed.md).
    Differentiable in q, k, v (exact; the backward runs the ring again).
    """
    world = dist.get_world_size(group)
    n = q.shape[2]
    total_len = world * n if total_len is None else total_len
    check_same_length(total_len, group)
    if padded_len(total_len, world, layout) != world * n:
        raise ValueError(f"a shard of {n} positions does not fit total_len={total_len} at {world} ranks ({layout})")
    if k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"q, k, v shards must have the same length, got {n}, {k.shape[2]}, {v.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask_mod = _mask_mod(method, causal, total_len, config)
    out, lse, stats = run_ring(q, k, v, group, causal, layout, scale, total_len, mask_mod, every_step=method == "full",
                                count_pairs=return_stats)
    if method != "full":
        log.debug("ring_attention %s: %d of %d steps, %d bytes saved per rank", method, stats["steps"], world,
                  stats["bytes_saved"])
    res = (out,) + ((lse,) if return_lse else ()) + ((stats,) if return_stats else ())
    return res[0] if len(res) == 1 else res
