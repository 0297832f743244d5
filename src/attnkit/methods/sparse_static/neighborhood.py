"""Neighborhood attention (NA), dilated NA, 1D / 2D / 3D, with NATTEN's window semantics.

Papers: Hassani et al., "Neighborhood Attention Transformer", arXiv:2204.07143 (2022);
Hassani & Shi, "Dilated Neighborhood Attention Transformer", arXiv:2209.15001 (2022)
(dilation); Hassani et al., "Generalized Neighborhood Attention", arXiv:2504.16922 (2025)
(even kernel sizes, the window formula used by NATTEN today). Tokens are the row-major
flattening of ``grid``; the rule is a product over axes (query coordinate x, key
coordinate y on an axis of length L, kernel K, dilation d):

- dilation group: y % d == x % d. The group of x has Lg = ceil((L - x % d) / d) members;
  in group coordinates the query is p = x // d and the key is t = y // d.
- non-causal: t lies in [s, s + K) with s = clamp(p - K // 2, 0, Lg - K): a window of
  exactly K group members centred on the query (K // 2 before it, K - 1 - K // 2 after
  it), shifted inward at the borders, never shrunk. This is NATTEN's
  ``get_window_start`` (CPU reference kernels) and its flex ``window_size_left/right``.
- causal: 0 <= p - t < K: the query and the K - 1 previous members of its group, fewer at
  the start of the axis (a causal window cannot shift forward), as NATTEN's causal mask.

``causal=True`` means causal along the sequence for 1D and along the first axis (time)
only for 3D, i.e. NATTEN's ``is_causal=(True, False, False)``: a query also sees later
tokens of its own frame, so the 3D causal pattern is frame-causal, not token-causal. A
2D grid has no causal variant here (a ValueError says so).

Geometry: with ``grid=None`` the axis is the key sequence (length Nk) and query i sits at
position Nk - Nq + i (Nq <= Nk); a grid requires Nq == Nk == prod(grid). On a non-causal
axis every dilation group must have at least K members (L // d >= K, NATTEN's
kernel_size * dilation <= L), else a ValueError. A causal axis accepts any length (its
window only looks back, so there is nothing to shift); NATTEN checks every axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...kernels.pattern import cdiv
from ...registry import register
from ..base import PatternMethod

# Intervals handled per step while building the block mask (bounds peak memory).
_CHUNK = 1 << 20


@register(
    "neighborhood",
    family="static_sparse",
    paper="Neighborhood Attention Transformer",
    arxiv="2204.07143",
    year=2022,
)
class Neighborhood(PatternMethod):
    """Each token attends to the kernel_size nearest tokens per axis of a 1D/2D/3D grid (NATTEN)."""

    @dataclass
    class Config:
        kernel_size: int | tuple = 7
        dilation: int | tuple = 1
        grid: tuple | None = None

    # ------------------------------------------------------------------ geometry

    @property
    def ndim(self) -> int:
        return 1 if self.config.grid is None else len(self.config.grid)

    def _per_axis(self, key: str) -> tuple[int, ...]:
        value = getattr(self.config, key)
        values = (value,) * self.ndim if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
        if len(values) != self.ndim:
            raise ValueError(
                f"{key} of method {self.name!r} must be an int or a tuple of {self.ndim} ints "
                f"(one per axis of grid={self.config.grid}), got {value!r}"
            )
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} of method {self.name!r} must hold integers >= 1, got {value!r}")
        return values

    def check_config(self) -> None:
        grid = self.config.grid
        if grid is not None:
            if not isinstance(grid, tuple) or not 1 <= len(grid) <= 3 or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in grid
            ):
                raise ValueError(
                    f"grid of method {self.name!r} must be None (1D over the sequence), (H, W) or (T, H, W) "
                    f"with integers >= 1, got {grid!r}"
                )
        kernel, dilation = self._per_axis("kernel_size"), self._per_axis("dilation")
        if grid is not None:
            for axis, (n, k, d) in enumerate(zip(grid, kernel, dilation)):
                if axis > 0 or len(grid) != 3:  # the time axis of a 3D grid may be causal
                    _check_axis(self.name, axis, n, k, d)
        self._kernel, self._dilation = kernel, dilation

    def _lengths(self, q_len: int, kv_len: int, causal: bool) -> tuple[int, ...]:
        """Axis lengths for these sequence lengths; raises for an impossible geometry."""
        if causal and self.ndim == 2:
            raise ValueError(
                f"method {self.name!r}: causal=True is supported for 1D (grid=None, causal along the sequence) "
                f"and 3D grids (causal along the first axis, time); got a 2D grid {self.config.grid}"
            )
        if self.config.grid is None:
            if q_len > kv_len:
                raise ValueError(
                    f"method {self.name!r} needs Nq <= Nk (queries are the last Nq positions of the "
                    f"sequence), got Nq={q_len}, Nk={kv_len}"
                )
            if not causal:  # a causal window only looks back: any length is fine
                _check_axis(self.name, 0, kv_len, self._kernel[0], self._dilation[0], what="sequence length Nk")
            return (kv_len,)
        n = math.prod(self.config.grid)
        if len(self.config.grid) == 3 and not causal:
            _check_axis(self.name, 0, self.config.grid[0], self._kernel[0], self._dilation[0])
        if not q_len == kv_len == n:
            raise ValueError(
                f"method {self.name!r} with grid={self.config.grid} needs Nq == Nk == {n} tokens "
                f"(the row-major flattening of the grid), got Nq={q_len}, Nk={kv_len}"
            )
        return tuple(self.config.grid)

    def _causal_axes(self, causal: bool) -> tuple[bool, ...]:
        return tuple(causal and axis == 0 for axis in range(self.ndim))

    # ------------------------------------------------------------------ element rule

    def mask_mod(self, causal: bool, kv_len: Optional[int] = None, device: Optional[torch.device] = None):
        """The element rule; 1D (grid=None) needs ``kv_len``, the axis length."""
        if self.config.grid is None:
            if kv_len is None:
                raise ValueError(f"method {self.name!r} with grid=None needs kv_len to build its rule")
            lengths = self._lengths(kv_len, kv_len, causal)
        else:
            lengths = self._lengths(math.prod(self.config.grid), math.prod(self.config.grid), causal)
        axes = list(zip(lengths, self._kernel, self._dilation, self._causal_axes(causal)))

        def neighborhood(b, h, q_pos, k_pos):
            allowed = None
            for (length, kernel, dilation, axis_causal), x, y in zip(
                axes, _coords(q_pos, lengths), _coords(k_pos, lengths)
            ):
                hit = _axis_rule(x, y, length, kernel, dilation, axis_causal)
                allowed = hit if allowed is None else allowed & hit
            return allowed

        return neighborhood

    # ------------------------------------------------------------------ block mask

    def block_mask(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> torch.Tensor:
        """(nQB, nKB) tiles touched by some query's window, from per-axis window bounds.

        Each query's window is a union of runs along the last axis (one run per member of
        its window on the other axes); every run is an interval of flattened keys, marked
        on a per-query-block difference array. Cost O(Nq * prod(kernel[:-1]) + nQB * nKB).
        Exact up to the dilation gaps inside a run (a superset where dilation > block).
        """
        lengths = self._lengths(q_len, kv_len, causal)
        bq, bk = self.block_size()
        nqb, nkb = cdiv(q_len, bq), cdiv(kv_len, bk)
        causal_axes = self._causal_axes(causal)
        bounds = [
            _axis_bounds(torch.arange(n, device=device), n, k, d, c)
            for n, k, d, c in zip(lengths, self._kernel, self._dilation, causal_axes)
        ]
        strides = [math.prod(lengths[a + 1 :]) for a in range(len(lengths))]
        # Offsets of the window members on every axis but the last: (M, ndim - 1).
        members = None
        if self.ndim > 1:
            members = torch.cartesian_prod(*[torch.arange(k, device=device) for k in self._kernel[:-1]])
            members = members[:, None] if members.dim() == 1 else members
        per_query = 1 if members is None else members.shape[0]
        diff = torch.zeros(nqb * (nkb + 1), dtype=torch.int32, device=device)
        offset = kv_len - q_len
        step = max(1, _CHUNK // per_query)
        for q0 in range(0, q_len, step):
            rows = torch.arange(q0, min(q_len, q0 + step), device=device)
            coords = _coords(rows + offset, lengths)
            lo_last, hi_last = (bound[coords[-1]] for bound in bounds[-1])
            base = torch.zeros(rows.shape[0], per_query, dtype=torch.long, device=device)
            valid = torch.ones_like(base, dtype=torch.bool)
            for axis in range(self.ndim - 1):
                lo, hi = (bound[coords[axis]][:, None] for bound in bounds[axis])
                y = lo + members[None, :, axis] * self._dilation[axis]
                valid &= y <= hi
                base += y * strides[axis]
            first = (base + lo_last[:, None]) // bk
            last = (base + hi_last[:, None]) // bk + 1
            qb = (rows // bq)[:, None].expand_as(first)
            ones = torch.ones(int(valid.sum()), dtype=torch.int32, device=device)
            diff.index_put_((qb[valid] * (nkb + 1) + first[valid],), ones, accumulate=True)
            diff.index_put_((qb[valid] * (nkb + 1) + last[valid],), -ones, accumulate=True)
        return (diff.view(nqb, nkb + 1).cumsum(-1) > 0)[:, :nkb]



def _check_axis(method: str, axis: int, length: int, kernel: int, dilation: int, what: str = "") -> None:
    if length // dilation < kernel:
        where = what or f"grid axis {axis} (length {length})"
        raise ValueError(
            f"method {method!r}: {where} is too short for kernel_size={kernel} with dilation={dilation}: "
            f"each dilation group needs at least kernel_size tokens, i.e. length >= kernel_size * dilation "
            f"= {kernel * dilation}, got {length}"
        )


def _coords(pos: torch.Tensor, lengths: tuple[int, ...]) -> list[torch.Tensor]:
    """Row-major coordinates of flattened positions (elementwise, vmap-safe)."""
    out = []
    for n in reversed(lengths[1:]):
        out.append(pos % n)
        pos = pos // n
    out.append(pos)
    return out[::-1]


def _window_start(x: torch.Tensor, length: int, kernel: int, dilation: int) -> torch.Tensor:
    """First group coordinate of the non-causal window of x (NATTEN's get_window_start)."""
    group_len = (length - x % dilation + dilation - 1) // dilation
    return torch.minimum((x // dilation - kernel // 2).clamp(min=0), group_len - kernel)


def _axis_rule(x: torch.Tensor, y: torch.Tensor, length: int, kernel: int, dilation: int, causal: bool) -> torch.Tensor:
    same_group = (x % dilation) == (y % dilation)
    if causal:
        dist = x - y
        return same_group & (dist >= 0) & (dist < kernel * dilation)
    start = _window_start(x, length, kernel, dilation)
    t = y // dilation
    return same_group & (t >= start) & (t < start + kernel)


def _axis_bounds(
    x: torch.Tensor, length: int, kernel: int, dilation: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last key coordinate of the window of each x (members step by dilation)."""
    if causal:
        back = torch.clamp(x // dilation, max=kernel - 1)
        return x - back * dilation, x
    first = _window_start(x, length, kernel, dilation) * dilation + x % dilation
    return first, first + (kernel - 1) * dilation
