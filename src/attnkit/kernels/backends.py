"""The one backend choice: which kernel runs a pattern, and why the others do not.

In the style of NATTEN's ``choose_backend``: each backend has a predicate
``can_run_<name>(pattern, q, k, v, needs, auto)`` that returns None when it can run the
call and otherwise the reason it declines. ``auto`` adds the preferences of
``backend="auto"`` (the dense mask only for short sequences, FlexAttention only where it
is compiled for the device, the range kernel only for patterns shared by every head);
without it a predicate answers whether the backend can run the call *at all*, which is
what a forced ``backend=`` and ``compatible_backends`` (the list tests loop over) use.

Patterns: a ``BlockPattern``, a ``VerticalSlashIndex`` (its own kernel, or any block
backend through its exact ``to_block_pattern``) or ``KeySlots`` (likewise). ``needs``
says whether gradients flow (``training``) and whether the log-sum-exp is wanted.

Backends (all but ``flex`` run as tiled plans: exact gradients, log-sum-exp):
- ``dense``: the pattern as an Nq x Nk boolean mask over exact attention;
- ``ranges``: fused calls over contiguous key ranges (strided views, no gather);
- ``blocks``: per-head causal block lists on square, aligned blocks;
- ``gather``: any pattern, key blocks gathered per chunk of query blocks;
- ``vertical_slash``: a ``VerticalSlashIndex``'s columns and diagonal runs;
- ``slots``: ``KeySlots``, each query block's own kept keys;
- ``flex``: FlexAttention (compiled); inference-only and without lse on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .. import validate
from . import flex as _flex
from .block_sparse import check_no_empty_rows, gather_plan
from .dense import dense_plan
from .pattern import BlockPattern
from .ranges import range_plan
from .slots import KeySlots, slots_plan
from .tiled import Plan, compute_dtype, tiled_attention
from .vertical_slash import (
    VerticalSlashIndex,
    aligned_blocks_supported,
    blocks_plan,
    to_block_pattern,
    vertical_slash_plan,
)

log = logging.getLogger("attnkit.kernels")

Pattern = Union[BlockPattern, VerticalSlashIndex, KeySlots]

# Up to this many (query, key) elements one masked dense call beats the sparse kernels.
DENSE_MAX_ELEMS = 1024 * 1024


@dataclass(frozen=True)
class Needs:
    """What the caller needs from a kernel: gradients (``training``) and the log-sum-exp."""

    training: bool = False
    return_lse: bool = False

    @staticmethod
    def of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool = False) -> "Needs":
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return Needs(training=grad, return_lse=return_lse)


def as_block_pattern(pattern: Pattern, q_heads: int) -> BlockPattern:
    """The pattern's exact BlockPattern (identity for BlockPatterns)."""
    if isinstance(pattern, VerticalSlashIndex):
        return to_block_pattern(pattern)
    if isinstance(pattern, KeySlots):
        return pattern.to_block_pattern(q_heads)
    return pattern


def can_run_dense(pattern, q, k, v, needs: Needs, auto: bool) -> Optional[str]:
    elems = q.shape[2] * k.shape[2]
    if auto and elems > DENSE_MAX_ELEMS:
        return f"Nq*Nk = {elems} > {DENSE_MAX_ELEMS}: the Nq x Nk mask is used for short sequences only"
    return None


def can_run_flex(pattern, q, k, v, needs: Needs, auto: bool) -> Optional[str]:
    ok, why = _flex.available()
    if not ok:
        return why
    if q.device.type == "cpu" and needs.training:
        return "FlexAttention on the CPU is inference-only (no backward in torch's CPU flex kernel)"
    if q.device.type == "cpu" and needs.return_lse:
        return "FlexAttention on the CPU cannot return the log-sum-exp"
    if auto and q.device.type != "cuda":
        return f"compiles per shape (seconds); auto uses it on CUDA only, not on {q.device.type}"
    return None


def _kind(pattern, kind: type) -> Optional[str]:
    """Why a backend for ``kind`` patterns declines ``pattern``, or None."""
    return None if isinstance(pattern, kind) else f"runs a {kind.__name__}, not a {type(pattern).__name__}"


def can_run_vertical_slash(pattern, q, k, v, needs: Needs, auto: bool) -> Optional[str]:
    return _kind(pattern, VerticalSlashIndex)


def can_run_slots(pattern, q, k, v, needs: Needs, auto: bool) -> Optional[str]:
    return _kind(pattern, KeySlots)


def can_run_ranges(pattern, q, k, v, needs: Needs, auto: bool) -> Optional[str]:
    if _kind(pattern, BlockPattern):
        return _kind(pattern, BlockPattern)
    if auto and (pattern.kv_blocks.shape[0] != 1 or pattern.kv_blocks.shape[1] != 1):
        return "pattern differs per batch/head (auto keeps ranges for shared patterns)"
    if auto and q.device.type != "cpu":
        return f"built on the CPU flash kernel; auto uses it on the CPU only, not on {q.device.type}"
    return None


def can_run_blocks(pattern, q, k, v, needs: Needs, auto: bool) -> Optional[str]:
    if _kind(pattern, BlockPattern):
        return _kind(pattern, BlockPattern)
    why = aligned_blocks_supported(pattern)
    if why:
        return why
    if auto and q.device.type != "cpu":
        return f"built on the CPU flash kernel; auto uses it on the CPU only, not on {q.device.type}"
    return None


def can_run_gather(pattern, q, k, v, needs: Needs, auto: bool) -> Optional[str]:
    if auto and not isinstance(pattern, BlockPattern):
        return f"a {type(pattern).__name__} has its own kernel (gather runs its block pattern only when forced)"
    return None


PREDICATES: dict[str, Callable[..., Optional[str]]] = {
    "dense": can_run_dense,
    "flex": can_run_flex,
    "vertical_slash": can_run_vertical_slash,
    "slots": can_run_slots,
    "ranges": can_run_ranges,
    "blocks": can_run_blocks,
    "gather": can_run_gather,
}
AUTO_ORDER = ("dense", "flex", "vertical_slash", "slots", "ranges", "blocks", "gather")
BACKENDS = ("auto",) + tuple(PREDICATES)


def compatible_backends(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, needs: Needs = Needs()) -> list[str]:
    """Every backend that can run this call when forced (tests loop over these)."""
    return [name for name, can_run in PREDICATES.items() if can_run(pattern, q, k, v, needs, False) is None]


def choose_backend(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, requested: str = "auto",
                   needs: Needs = Needs(), method: str = "?") -> str:
    """Resolve ``requested`` to the backend that will run; a forced backend that cannot
    run the call is a ValueError naming the reason and the compatible backends."""
    if requested not in BACKENDS:
        validate.unknown_name("backend", requested, list(BACKENDS))
    if requested != "auto":
        why = PREDICATES[requested](pattern, q, k, v, needs, False)
        if why is not None:
            ok = ", ".join(compatible_backends(pattern, q, k, v, needs))
            raise ValueError(f"backend {requested!r} cannot run method {method!r} here: {why}. Compatible backends: auto, {ok}")
        return requested
    declined = []
    for name in AUTO_ORDER:
        why = PREDICATES[name](pattern, q, k, v, needs, True)
        if why is None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("auto -> %s for %s (%s)", name, method, "; ".join(declined) or "first choice")
            return name
        declined.append(f"{name}: {why}")
    raise AssertionError("gather accepts every BlockPattern")  # pragma: no cover


def plan_for(backend: str, pattern: Pattern, q: torch.Tensor) -> Plan:
    """The tiled plan of ``pattern`` on ``backend`` (any backend but ``flex``), kept on the
    pattern object: a static method reuses its pattern, and the plan's run structure and
    masks, across calls of the same shape."""
    key = (backend, compute_dtype(q.dtype), q.shape[1])
    plans = pattern.__dict__.setdefault("_plans", {})
    if key not in plans:
        plans[key] = _new_plan(backend, pattern, q)
    return plans[key]


def _new_plan(backend: str, pattern: Pattern, q: torch.Tensor) -> Plan:
    dtype = compute_dtype(q.dtype)
    if backend == "vertical_slash":
        return vertical_slash_plan(pattern, dtype)
    if backend == "slots":
        return slots_plan(pattern, dtype)
    block = as_block_pattern(pattern, q.shape[1])
    if backend == "dense":
        return dense_plan(block, dtype)
    if backend == "ranges":
        return range_plan(block, dtype)
    if backend == "blocks":
        return blocks_plan(block, dtype)
    return gather_plan(block, dtype)


def run(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str = "auto",
        return_lse: bool = False, method: str = "?") -> tuple[torch.Tensor, Optional[torch.Tensor], str]:
    """Attention over ``pattern``. q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv).

    Returns (out (B, Hq, Nq, Dv), lse (B, Hq, Nq) or None, the backend that ran). Rows
    with no allowed key: out 0, lse -inf (FlexAttention, which has no lse here, checks
    the pattern for such rows instead and raises). Differentiable except on ``flex`` (CPU).
    """
    needs = Needs.of(q, k, v, return_lse)
    chosen = choose_backend(pattern, q, k, v, backend, needs, method)
    if chosen == "flex":
        block = as_block_pattern(pattern, q.shape[1])
        if return_lse:
            out, lse = _flex.flex_attention(q, k, v, block, scale, return_lse=True)
            return out, lse, chosen
        check_no_empty_rows(block, method)
        return _flex.flex_attention(q, k, v, block, scale), None, chosen
    out, lse = tiled_attention(q, k, v, plan_for(chosen, pattern, q), scale)
    return out, lse, chosen
