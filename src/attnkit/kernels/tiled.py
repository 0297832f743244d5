"""Tiled attention: a kernel is a list of fused calls; forward and backward are written once.

A kernel (ranges, gather, vertical-slash, blocks, key slots, dense, exact) describes its
work as a *plan*: a sequence of ``Call``s, each one fused attention call (``flash``) of
some query rows against some keys, with an optional additive mask or top-left causal
rule. Rows of one call never repeat; several calls may serve the same rows (disjoint key
sets). This module runs a plan:

- forward: each call's (out, lse) is merged into its rows' running result with
  ``merge_partials`` (as FlashAttention merges tiles), so no call ever needs another's
  keys and the rows' final (out, lse) is exact;
- backward (``TiledAttention``, a ``torch.autograd.Function``): the plan is generated
  again and each call's share of dq, dk, dv is computed from the rows' *final* out and
  lse (FlashAttention-2's backward), then scattered back to the keys it read. Nothing
  but q, k, v, out and lse is saved; no Nq x Nk tensor is built unless a call's own
  tile is that large (the dense backend). A gradient flowing into lse (ring attention,
  merges outside the kernel) enters as one extra head column: v gets a zero column,
  dO a column of ones and O a column of -dlse, so the kernel's rowsum(dO * O) becomes
  rowsum(dO * O) - dlse, which is exactly lse's contribution to dS.

Views: calls read rows and keys through ``RowSel`` / ``KeySel`` objects (strided views of
the padded inputs, or gathers into reusable buffers); the same objects write gradients
back (``index_add_`` where key windows overlap). Inputs are converted once to the
compute dtype (float64 for float64, else float32) and padded once: head sizes to one
size E = max(D, Dv), query rows to whole blocks, keys at the front / back as the plan
asks (padded keys must be masked by the plan).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .flash import MASKED, tile_backward, tile_forward
from .merge import merge_partials


@dataclass
class Geometry:
    """Shapes of one tiled call, after padding. Positions: query row i (0-based, before
    padding) sits at absolute key position ``Nk - Nq + i``; padded key j sits at j - k_front."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_size: int = 0  # E: the one head size of q, k, v inside the calls
    q_pad: int = 0
    k_front: int = 0
    k_back: int = 0

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads


class RowSel:
    """Which query rows a call serves, as a view of a (B, Hq, Nq_padded, X) tensor.

    ``blocks`` consecutive blocks of ``block`` rows starting at row ``start`` of query heads
    ``head0, head0 + step, ...`` (``heads`` of them) of batch ``batch`` (None: every batch,
    then ``blocks`` must be 1). The view is (blocks, heads, block, X) (``heads_first``:
    (heads, blocks, block, X)); with batch None it is (B, heads, block, X).
    """

    def __init__(self, batch: Optional[int], head0: int, step: int, heads: int, start: int, block: int,
                 blocks: int = 1, heads_first: bool = False) -> None:
        if batch is None and blocks != 1:
            raise ValueError("a row selection over every batch holds one block")
        self.batch, self.head0, self.step, self.heads = batch, head0, step, heads
        self.start, self.block, self.blocks, self.heads_first = start, block, blocks, heads_first

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        heads = slice(self.head0, self.head0 + self.step * (self.heads - 1) + 1, self.step)
        if self.batch is None:
            return x[:, heads, self.start : self.start + self.block]
        y = x[self.batch, heads, self.start : self.start + self.blocks * self.block]
        y = y.view(self.heads, self.blocks, self.block, x.shape[-1])
        return y if self.heads_first else y.transpose(0, 1)


class FoldedRows:
    """Every query row of every query head, the ``group`` heads of each KV head folded into
    the rows: a (B, Hkv, group x Nq, X) view of a contiguous (B, Hq, Nq, X) tensor (for
    calls without a per-row rule: non-causal, or one query)."""

    def __init__(self, kv_heads: int) -> None:
        self.kv_heads = kv_heads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, hq, n, e = x.shape
        return x.view(b, self.kv_heads, (hq // self.kv_heads) * n, e)


class KeySel:
    """How a call reads keys (and values) from a (B, Hkv, Nk_padded, X) tensor and puts
    their gradients back. Subclasses: ``WindowKeys``, ``GatheredKeys``."""

    def read(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def put(self, dx: torch.Tensor, grad: torch.Tensor) -> None:
        raise NotImplementedError


class WindowKeys(KeySel):
    """Block i of the call reads keys [start + i * step, start + i * step + length) of KV
    heads ``head0, head0 + hstep, ...`` (``heads``) of batch ``batch`` (None: every batch,
    one block). ``step`` 0: every block reads the same keys (a stride-0 view); windows may
    overlap (a sliding window). View layout as ``RowSel`` with the same ``heads_first``."""

    def __init__(self, batch: Optional[int], head0: int, hstep: int, heads: int, start: int, length: int,
                 step: int = 0, blocks: int = 1, heads_first: bool = False) -> None:
        self.batch, self.head0, self.hstep, self.heads = batch, head0, hstep, heads
        self.start, self.length, self.step, self.blocks, self.heads_first = start, length, step, blocks, heads_first

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        heads = slice(self.head0, self.head0 + self.hstep * (self.heads - 1) + 1, self.hstep)
        return x[:, heads] if self.batch is None else x[self.batch, heads]

    def read(self, x: torch.Tensor, name: str = "") -> torch.Tensor:
        y = self._heads(x)
        if self.batch is None:
            return y[:, :, self.start : self.start + self.length]
        h, _, e = y.shape
        view = y.as_strided(
            (h, self.blocks, self.length, e),
            (y.stride(0), self.step * y.stride(1), y.stride(1), y.stride(2)),
            y.storage_offset() + self.start * y.stride(1),
        )
        return view if self.heads_first else view.transpose(0, 1)

    def put(self, dx: torch.Tensor, grad: torch.Tensor) -> None:
        y = self._heads(dx)
        if self.batch is None:
            y[:, :, self.start : self.start + self.length] += grad
            return
        g = grad if self.heads_first else grad.transpose(0, 1)  # (heads, blocks, length, E)
        h, e = g.shape[0], g.shape[-1]
        if self.step == 0 or self.blocks == 1:
            y[:, self.start : self.start + self.length] += g.sum(1)
        elif self.length % self.step == 0:
            # windows of m steps: the j-th step of every window is one strided, non-overlapping add
            for j in range(self.length // self.step):
                a = self.start + j * self.step
                part = y[:, a : a + self.blocks * self.step].view(h, self.blocks, self.step, e)
                part += g[:, :, j * self.step : (j + 1) * self.step]
        else:  # overlapping windows
            pos = (torch.arange(self.blocks, device=dx.device)[:, None] * self.step
                   + torch.arange(self.length, device=dx.device) + self.start).flatten()
            y.index_add_(1, pos, g.reshape(h, -1, e))


class GatheredKeys(KeySel):
    """Block i of the call reads the keys at ``positions[..., i, :]`` of its KV head.

    positions: (blocks, length) shared by the heads, or (heads, blocks, length) per head;
    KV heads ``head0, head0 + hstep, ...`` of batch ``batch``. Reads gather into reusable
    buffers (a fresh large CPU allocation costs more in page faults than the copy).
    """

    def __init__(self, batch: int, head0: int, hstep: int, heads: int, positions: torch.Tensor,
                 heads_first: bool = False, scratch: Optional["Scratch"] = None, blocks: int = 1) -> None:
        self.batch, self.head0, self.hstep, self.heads = batch, head0, hstep, heads
        self.positions, self.heads_first, self.scratch = positions, heads_first, scratch
        # positions with one block row and ``blocks`` > 1: every block reads the same keys
        self.expand = blocks if positions.shape[-2] == 1 and blocks > 1 else 0
        self._memo: dict[str, torch.Tensor] = {}  # reads shared by several calls (no scratch)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.batch, self.head0 : self.head0 + self.hstep * (self.heads - 1) + 1 : self.hstep]

    def read(self, x: torch.Tensor, name: str = "") -> torch.Tensor:
        if self.scratch is None and name in self._memo:
            return self._memo[name]
        y = self._heads(x)  # (heads, Nk, E)
        h, e = y.shape[0], y.shape[-1]
        pos = self.positions
        shape = (h, *pos.shape[-2:], e)
        if y.is_contiguous():
            # rows of the (heads x Nk, E) matrix: the fastest gather on the CPU
            head_rows = torch.arange(h, device=pos.device).view(h, 1, 1) * y.shape[1]
            rows = (head_rows + pos).reshape(-1)
            if self.scratch is not None:
                out = self.scratch.view(name, (rows.numel(), e), y)
                torch.index_select(y.view(-1, e), 0, rows, out=out)
            else:
                out = y.view(-1, e).index_select(0, rows)
            g = out.view(shape)
        elif pos.dim() == 2:
            g = y.index_select(1, pos.reshape(-1)).view(shape)
        else:
            g = torch.gather(y, 1, pos.reshape(h, -1, 1).expand(-1, -1, e)).view(shape)
        if self.expand:
            g = g.expand(h, self.expand, *g.shape[2:])
        g = g if self.heads_first else g.transpose(0, 1)
        if self.scratch is None and name:
            self._memo[name] = g
        return g

    def put(self, dx: torch.Tensor, grad: torch.Tensor) -> None:
        y = self._heads(dx)
        h, e = y.shape[0], y.shape[-1]
        g = grad if self.heads_first else grad.transpose(0, 1)
        if self.expand:
            g = g.sum(1, keepdim=True)
        g = g.reshape(h, -1, e)
        pos = self.positions
        if y.is_contiguous():
            head_rows = torch.arange(h, device=pos.device).view(h, 1, 1) * y.shape[1]
            y.view(-1, e).index_add_(0, (head_rows + pos).reshape(-1), g.reshape(-1, e))
        elif pos.dim() == 2:
            y.index_add_(1, pos.reshape(-1), g)
        else:
            y.scatter_add_(1, pos.reshape(h, -1, 1).expand(-1, -1, e), g)


class Scratch:
    """Reusable gather buffers, one flat tensor per name, grown on demand."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def view(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:numel].view(shape)


@dataclass
class Call:
    """One fused attention call: ``rows`` against ``keys``.

    mask: additive (0 = allowed, ``MASKED`` = not), broadcastable to the call's
    (b, h, r, s) scores, or None. causal: top-left causal inside the tile (r == s tiles
    on the diagonal)."""

    rows: "RowSel | FoldedRows"
    keys: KeySel
    mask: Optional[torch.Tensor] = None
    causal: bool = False


@dataclass
class Plan:
    """A kernel's work: ``calls(geometry, scratch)`` yields its Calls (generated again for
    the backward, so keep it a pure function of the pattern and shapes).

    q_pad: query rows appended (to make whole blocks); k_front / k_back: zero keys added
    before / after the real ones (they must be masked by the calls). ``name``: the
    kernel's name (``stats.backend``)."""

    name: str
    calls: Callable[[Geometry, Scratch], Iterable[Call]]
    q_pad: int = 0
    k_front: int = 0
    k_back: int = 0
    info: dict = field(default_factory=dict)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def scratch(self) -> "Scratch":
        """This thread's gather buffers, kept with the plan: a static method reuses its
        plan, and a buffer that stays mapped costs no page faults on the next call."""
        if not hasattr(self._local, "scratch"):
            self._local.scratch = Scratch()
        return self._local.scratch


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool allowed-pairs tensor -> additive mask (0 allowed, ``MASKED`` not)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, MASKED)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _padded(x: torch.Tensor, width: int, front: int, back: int, dtype: torch.dtype) -> torch.Tensor:
    """x (B, H, N, D) -> (B, H, front + N + back, width) contiguous in ``dtype``, zero padded."""
    x = x.to(dtype)
    if width == x.shape[-1] and front == back == 0:
        return x.contiguous()
    return F.pad(x, (0, width - x.shape[-1], front, back)).contiguous()


def _geometry(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> Geometry:
    e = max(q.shape[-1], v.shape[-1])
    return Geometry(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], e, plan.q_pad, plan.k_front, plan.k_back)


def run_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a plan. q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv).

    Returns out (B, Hq, Nq, E) and lse (B, Hq, Nq) in the compute dtype (E = max(D, Dv);
    rows without a key: out 0, lse -inf)."""
    c = compute_dtype(q.dtype)
    e = max(q.shape[-1], v.shape[-1])
    nq = q.shape[2]
    qc = _padded(q, e, 0, plan.q_pad, c)
    kc, vc = (_padded(x, e, plan.k_front, plan.k_back, c) for x in (k, v))
    out = torch.zeros(qc.shape, dtype=c, device=q.device)
    lse = torch.full(qc.shape[:3], float("-inf"), dtype=c, device=q.device)
    lse4 = lse.unsqueeze(-1)
    scratch = plan.scratch()
    rows, parts = None, []

    def flush() -> None:
        acc, acc_lse = rows(out), rows(lse4)[..., 0]
        if bool(torch.isfinite(acc_lse).any()):  # rows already hold a partial result
            parts.append((acc, acc_lse))
        merge_partials(parts, out=acc, lse_out=acc_lse)  # also zeroes rows without a key
        parts.clear()

    for call in plan.calls(_geometry(q, k, v, plan), scratch):
        if rows is not None and call.rows is not rows:
            flush()
        rows = call.rows
        part_out, part_lse = tile_forward(rows(qc), call.keys.read(kc, "k"), call.keys.read(vc, "v"), scale, call.causal, call.mask)
        parts.append((part_out, part_lse.to(c)))
    if parts:
        flush()
    if plan.q_pad:
        return out[:, :, :nq].contiguous(), lse[:, :, :nq].contiguous()
    return out, lse


def run_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dout: torch.Tensor, dlse: Optional[torch.Tensor], plan: Plan, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of a plan's attention. out: (B, Hq, Nq, E) compute dtype; lse (B, Hq, Nq);
    dout: (B, Hq, Nq, Dv); dlse: (B, Hq, Nq) or None. Returns dq, dk, dv in the inputs' dtypes."""
    c = compute_dtype(q.dtype)
    d, dv_size = q.shape[-1], v.shape[-1]
    e = max(d, dv_size)
    with_lse = dlse is not None and bool((dlse != 0).any())
    width = e + 1 if with_lse else e
    qc = _padded(q, width, 0, plan.q_pad, c)
    kc, vc = (_padded(x, width, plan.k_front, plan.k_back, c) for x in (k, v))
    do = _padded(dout, width, 0, plan.q_pad, c)
    oc = _padded(out, width, 0, plan.q_pad, c)
    if with_lse:
        do[:, :, : q.shape[2], e] = 1.0
        oc[:, :, : q.shape[2], e] = -dlse.to(c)
    lse_b = F.pad(lse.to(c).masked_fill(torch.isneginf(lse), float("inf")), (0, plan.q_pad)).unsqueeze(-1)
    dq, dk, dv = torch.zeros_like(qc), torch.zeros_like(kc), torch.zeros_like(vc)
    scratch = plan.scratch()
    for call in plan.calls(_geometry(q, k, v, plan), scratch):
        rows = call.rows
        gq, gk, gv = tile_backward(
            rows(do), rows(qc), call.keys.read(kc, "k"), call.keys.read(vc, "v"), rows(oc), rows(lse_b)[..., 0],
            scale, call.causal, call.mask,
        )
        rows(dq).add_(gq)
        call.keys.put(dk, gk)
        call.keys.put(dv, gv)
    nq, nk, kf = q.shape[2], k.shape[2], plan.k_front
    return (dq[:, :, :nq, :d].to(q.dtype), dk[:, :, kf : kf + nk, :d].to(k.dtype), dv[:, :, kf : kf + nk, :dv_size].to(v.dtype))


class TiledAttention(torch.autograd.Function):
    """(q, k, v) -> (out, lse) over a plan, differentiable in q, k, v through out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, scale: float):  # noqa: D102
        with torch.no_grad():
            out_c, lse = run_forward(q, k, v, plan, scale)
        out = out_c[..., : v.shape[-1]].to(q.dtype)
        ctx.save_for_backward(q, k, v, out_c, lse)
        ctx.plan, ctx.scale = plan, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # noqa: D102
        q, k, v, out_c, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        with torch.no_grad():
            dq, dk, dv = run_backward(q, k, v, out_c, lse, dout, dlse, ctx.plan, ctx.scale)
        return dq, dk, dv, None, None


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a plan. q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv).

    Returns out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) (float64 for float64
    inputs, else float32); a row without an allowed key gets out 0 and lse -inf.
    Differentiable in q, k, v (both outputs)."""
    return TiledAttention.apply(q, k, v, plan, scale)
