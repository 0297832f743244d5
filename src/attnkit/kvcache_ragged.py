"""``RaggedKV``: KV storage in which every (batch row, KV head) holds its own number of
tokens — the storage of an ``attnkit.KVCache`` layer whose policy keeps different token
counts per head (``duo``'s retrieval and streaming heads, ``adakv``'s shared budget,
per-head plans; docs/kv-cache.md, "Per-head (ragged) storage").

Layout (paged, as vLLM's PagedAttention): a segment is one (row b, KV head h),
``s = b * Hkv + h``; its tokens live in pages of ``page`` slots taken from one pool per
layer:

- ``k``: (Npages, P, Dk), ``v``: (Npages, P, Dv): the pool (``attnkit.kvcache_quant``:
  a ``Pool`` in the model dtype, or a ``QuantPool`` of int8 / 4-bit codes with one float32
  scale per slot, ``bits=``); ``pos``: (Npages, P) int32, the original position of each
  slot, ``-1`` for a slot that holds no token;
- ``owner``: (Npages,) long, the segment of each page, ``-1`` for a free page;
- ``table``: (S, M) long, the pages of each segment in order (``-1`` past its end);
  slot j of segment s is slot ``j % P`` of page ``table[s, j // P]``;
- ``length``: (S,) long, slots used per segment (slots ``>= length`` hold ``pos = -1``).

A segment wastes at most ``P - 1`` slots (its last page; ``page_size`` picks P from the
mean head length, about 3% of the tokens on average); the pool grows by at least a
thirty-second of its size when it runs out of free pages, so appends are amortised O(1)
per token. Decode attention (``attend``) is a segment softmax over the pool: one batched
matmul of every page with the queries of its segment, exact log-sum-exp per segment
(``scatter_reduce`` / ``index_add``), GQA by giving each segment the g query heads of its
KV head. Nothing of size (B, H, max_len, D) is built on that path; ``padded`` builds it
on request (a policy that scores keys, beam-search reordering).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .kvcache_quant import Pool
from .methods.kvcache.base import LayerView, nbytes_of

PAGE_RANGE = (4, 64)  # slots per page: a power of two in this range, by the mean head length
GROWTH = 32  # the pool grows by at least 1/GROWTH of its pages (slack <= ~3%)


def page_size(mean_length: float) -> int:
    """Slots per page for heads of ``mean_length`` tokens on average: the power of two
    nearest below ``mean_length / 16`` within ``PAGE_RANGE``, so the last pages' unused
    slots (P / 2 per head on average) stay near 3% of the tokens held, and long heads get
    large pages (fewer, larger matmuls)."""
    low, high = PAGE_RANGE
    p = low
    while p * 2 <= min(mean_length / 16, high):
        p *= 2
    return p


class RaggedKV:
    """Paged per-(row, KV head) keys, values and positions of one cache layer (see the
    module docstring for the layout). Build with ``from_padded``."""

    def __init__(self, k: Pool, v: Pool, pos: torch.Tensor, owner: torch.Tensor,
                 table: torch.Tensor, length: torch.Tensor, batch: int, heads: int) -> None:
        self.k, self.v, self.pos, self.owner, self.table, self.length = k, v, pos, owner, table, length
        self.batch, self.heads = batch, heads
        self.page = pos.shape[1]
        self.bits = k.bits  # None (full precision), 8 or 4

    # --- building -----------------------------------------------------------------------

    @classmethod
    def from_padded(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor,
                    page: Optional[int] = None, bits: Optional[int] = None) -> "RaggedKV":
        """The ``keep`` slots (B, Hkv, L) bool of keys (B, Hkv, L, Dk), values (B, Hkv, L, Dv),
        positions (B, Hkv, L) long, in slot order, each segment in its own pages (no slack).
        ``page``: slots per page; default ``page_size`` of the mean kept length. ``bits``:
        None (keys / values in their dtype) or 8 / 4 (quantized per slot, ``QuantPool``)."""

        def fill(total: int, page: int, dest: torch.Tensor, seg: torch.Tensor, slot: torch.Tensor) -> list[Pool]:
            pools = []
            for x in (keys, values):
                pool = Pool.new(total, page, x, bits)
                pool.write(dest, x.reshape(-1, x.shape[2], x.shape[3])[seg, slot])
                pools.append(pool)
            return pools

        return cls._build(positions, keep, page, fill)

    @classmethod
    def _build(cls, positions: torch.Tensor, keep: torch.Tensor, page: Optional[int],
               fill: Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], list[Pool]]) -> "RaggedKV":
        """The page layout of the ``keep`` slots (B, Hkv, L); ``fill(total pages, P, dest,
        seg, slot)`` gives the key and value pools with kept slot (seg, slot) of the padded
        view at flat pool slot dest."""
        b, h, length = positions.shape
        s, dev = b * h, positions.device
        keep = keep.reshape(s, length)
        counts = keep.sum(dim=-1)
        page = page or page_size(int(counts.sum()) / max(s, 1))
        npages = (counts + page - 1) // page
        total = int(npages.sum())
        start = torch.cumsum(npages, 0) - npages
        m = int(npages.max()) if s else 0
        col = torch.arange(m, device=dev)
        table = torch.where(col < npages[:, None], start[:, None] + col, -1)
        owner = torch.repeat_interleave(torch.arange(s, device=dev), npages)
        seg, slot = keep.nonzero(as_tuple=True)
        rank = torch.arange(seg.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[seg]
        dest = (start[seg] + rank // page) * page + rank % page
        k, v = fill(total, page, dest, seg, slot)
        pos = torch.full((total, page), -1, dtype=torch.int32, device=dev)
        pos.view(-1)[dest] = positions.reshape(s, length)[seg, slot].to(torch.int32)
        return cls(k, v, pos, owner, table, counts, b, h)

    def _grow(self, need: int) -> None:
        """Make room for ``need`` more pages than are free (at least 1/GROWTH of the pool)."""
        free = int((self.owner < 0).sum())
        if need <= free:
            return
        more = max(need - free, -(-self.pos.shape[0] // GROWTH))
        self.k.grow(more)
        self.v.grow(more)
        self.pos = torch.cat([self.pos, self.pos.new_full((more, self.page), -1)])
        self.owner = torch.cat([self.owner, self.owner.new_full((more,), -1)])

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Add T tokens to every segment: k (B, Hkv, T, Dk), v (B, Hkv, T, Dv), positions (T,)."""
        s, t, p = self.length.numel(), k.shape[2], self.page
        have = (self.length + p - 1) // p
        need = (self.length + t + p - 1) // p
        extra = need - have
        n = int(extra.sum())
        if n:
            self._grow(n)
            ids = (self.owner < 0).nonzero().flatten()[:n]
            m = int(need.max())
            if m > self.table.shape[1]:
                self.table = torch.cat([self.table, self.table.new_full((s, m - self.table.shape[1]), -1)], 1)
            col = torch.arange(m, device=ids.device)
            new = (col >= have[:, None]) & (col < need[:, None])  # (S, M) slots of the new pages, in order
            self.table[new] = ids
            self.owner[ids] = new.nonzero(as_tuple=True)[0]
        j = self.length[:, None] + torch.arange(t, device=k.device)  # (S, T) slot numbers
        dest = self.table.gather(1, j // p) * p + j % p
        self.k.write(dest.flatten(), k.reshape(s * t, -1))
        self.v.write(dest.flatten(), v.reshape(s * t, -1))
        self.pos.view(-1)[dest.flatten()] = positions.to(torch.int32).repeat(s)
        self.length = self.length + t

    def mark_empty(self, empty: torch.Tensor) -> None:
        """The last T slots of each row's segments hold no token where ``empty`` (B, T) is True."""
        t = empty.shape[1]
        j = self.length[:, None] - t + torch.arange(t, device=empty.device)
        flat = (self.table.gather(1, j // self.page) * self.page + j % self.page).view(self.batch, self.heads, t)
        drop = flat[empty[:, None, :].expand_as(flat)]
        self.pos.view(-1)[drop] = -1

    # --- reading ------------------------------------------------------------------------

    def slots(self) -> torch.Tensor:
        """(S, L) long: flat pool slot of each segment's slot j (L = longest), -1 past its end."""
        j = torch.arange(self.max_length(), device=self.length.device)
        if j.numel() == 0:
            return self.length.new_zeros(self.length.numel(), 0)
        page = self.table.gather(1, (j // self.page).expand(self.length.numel(), -1))
        return torch.where(j < self.length[:, None], page * self.page + j % self.page, -1)

    def positions(self) -> torch.Tensor:
        """(B, Hkv, L) long: the padded view of the positions (-1 = empty), slot order."""
        idx = self.slots()
        out = torch.where(idx >= 0, self.pos.view(-1)[idx.clamp(min=0)].long(), -1)
        return out.view(self.batch, self.heads, -1)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys (B, Hkv, L, Dk), values (B, Hkv, L, Dv)) padded with zeros: a copy (dequantized
        in the model dtype), for policies that score keys and for batch reordering, never
        for decode attention."""
        idx = self.slots()
        empty = (idx < 0)[..., None]
        out = []
        for pool in (self.k, self.v):
            flat = pool.read(idx.clamp(min=0)).masked_fill(empty, 0)
            out.append(flat.view(self.batch, self.heads, idx.shape[1], -1))
        return out[0], out[1]

    def counts(self) -> torch.Tensor:
        """(B, Hkv) long: tokens held per segment."""
        per_page = (self.pos >= 0).sum(dim=1) * (self.owner >= 0)
        out = self.length.new_zeros(self.length.numel()).index_add_(0, self.owner.clamp(min=0), per_page)
        return out.view(self.batch, self.heads)

    def max_length(self) -> int:
        """Slots of the longest segment."""
        return int(self.length.max()) if self.length.numel() else 0

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k.tensors(), *self.v.tensors(), self.pos, self.owner, self.table, self.length]

    def nbytes(self) -> int:
        """Bytes allocated (pool (codes and scales when quantized), positions and page tables)."""
        return nbytes_of(self.tensors())

    # --- changing -----------------------------------------------------------------------

    def compact(self, keep: torch.Tensor) -> None:
        """Keep only the ``keep`` slots (B, Hkv, L) of the padded view (slot order), in place:
        kept slots move to the front of their segment (only slots that move are copied),
        pages past a segment's new end are freed."""
        idx = self.slots()  # (S, L)
        s, length = idx.shape
        keep = keep.reshape(s, length) & (idx >= 0)
        counts = keep.sum(dim=-1)
        rank = torch.cumsum(keep.long(), dim=-1) - 1
        j = rank.clamp(min=0)
        dest = self.table.gather(1, j // self.page) * self.page + j % self.page
        move = keep & (dest != idx)
        src, dst = idx[move], dest[move]
        for pool in (self.k, self.v):
            pool.move(dst, src)
        flat_pos = self.pos.view(-1)
        flat_pos[dst] = flat_pos[src]
        stale = (idx >= 0) & (torch.arange(length, device=idx.device) >= counts[:, None])
        flat_pos[idx[stale]] = -1
        pages = (counts + self.page - 1) // self.page
        col = torch.arange(self.table.shape[1], device=idx.device)
        freed = (col >= pages[:, None]) & (self.table >= 0)
        self.owner[self.table[freed]] = -1
        self.table = self.table.masked_fill(freed, -1)[:, :max(int(pages.max()), 1)]
        self.length = counts

    def apply_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "RaggedKV":
        """A new storage with ``fn`` applied along the batch dim (beam reorder, repeat); goes
        through the padded view of the slots' raw content (quantized codes and scales are
        copied as they are, never re-quantized)."""
        idx = self.slots().clamp(min=0)
        positions = fn(self.positions())
        raws = [[fn(r.view(self.batch, self.heads, *r.shape[1:])) for r in pool.take(idx)] for pool in (self.k, self.v)]

        def fill(total: int, page: int, dest: torch.Tensor, seg: torch.Tensor, slot: torch.Tensor) -> list[Pool]:
            pools = []
            for pool, raw in zip((self.k, self.v), raws):
                new = pool.like(total)
                new.put(dest, [r.reshape(-1, *r.shape[2:])[seg, slot] for r in raw])
                pools.append(new)
            return pools

        return RaggedKV._build(positions, positions >= 0, self.page, fill)

    # --- attention ----------------------------------------------------------------------

    def attend(self, q: torch.Tensor, scale: float, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q: (B, Hq, T, D) at positions ``first .. first + T - 1`` over each
        KV head's own slots (causal by position) -> (out (B, Hq, T, Dv), lse (B, Hq, T)).

        Segment softmax: scores of every pool page against the g * T queries of its segment
        (one bmm), the per-segment max by ``scatter_reduce``, sums and outputs by
        ``index_add``. A query with no key gets output 0 and lse -inf. Quantized pools: the
        codes enter the matmuls in q's dtype, each slot's float32 scale multiplies its
        scores (keys) and its probabilities (values).
        """
        b, hq, t, d = q.shape
        s, g, dv = self.length.numel(), hq // self.heads, self.v.dim
        acc = torch.promote_types(q.dtype, torch.float32)
        qs = q.reshape(b, self.heads, g * t, d).reshape(s, g * t, d)
        owner = self.owner.clamp(min=0)
        keys, k_scale = self.k.operand(q.dtype)
        scores = torch.bmm(qs[owner], keys.transpose(1, 2)).to(acc) * scale  # (Np, gT, P)
        if k_scale is not None:
            scores = scores * k_scale[:, None, :]
        allowed = (self.pos >= 0) & (self.owner >= 0)[:, None]
        allowed = allowed[:, None, :]
        if t > 1:
            qpos = (first + torch.arange(t, device=q.device)).repeat(g)  # row r = gi * T + ti
            allowed = allowed & (self.pos[:, None, :] <= qpos[None, :, None])
        scores = scores.masked_fill(~allowed, float("-inf"))
        rows = owner[:, None].expand(-1, g * t)
        m = scores.new_full((s, g * t), float("-inf")).scatter_reduce(0, rows, scores.amax(dim=-1), "amax")
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(scores - m[owner][..., None])
        total = p.new_zeros(s, g * t).index_add_(0, owner, p.sum(dim=-1))
        values, v_scale = self.v.operand(self.v.dtype)
        pv = p if v_scale is None else p * v_scale[:, None, :]
        out = torch.bmm(pv.to(values.dtype), values).to(acc)
        out = out.new_zeros(s, g * t, dv).index_add_(0, owner, out)
        out = out / total.clamp(min=torch.finfo(acc).tiny)[..., None]
        lse = m + total.log()
        return (out.to(q.dtype).reshape(b, self.heads, g, t, dv).reshape(b, hq, t, dv),
                lse.reshape(b, hq, t))


class RaggedView(LayerView):
    """The ``LayerView`` of a ragged layer: ``positions`` padded (B, Hkv, L) (cheap);
    ``keys`` / ``values`` (B, Hkv, L, D) are built from the pool only if a policy reads
    them (SnapKV-like scores do, recency / head-role rules such as ``duo``'s do not)."""

    def __init__(self, ragged: RaggedKV, **fields: object) -> None:
        self._ragged = ragged
        self._kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        super().__init__(keys=None, values=None, **fields)  # type: ignore[arg-type]

    def _padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kv is None:
            self._kv = self._ragged.padded()
        return self._kv

    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor:
        return self._padded()[0]

    @keys.setter
    def keys(self, value: Optional[torch.Tensor]) -> None:
        if value is not None:
            self._kv = (value, self._padded()[1])

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor:
        return self._padded()[1]

    @values.setter
    def values(self, value: Optional[torch.Tensor]) -> None:
        if value is not None:
            self._kv = (self._padded()[0], value)

    @property
    def group(self) -> int:
        return 1 if self.queries is None else self.queries.shape[1] // self.positions.shape[1]
