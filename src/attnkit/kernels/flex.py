"""FlexAttention backend: the pattern as a ``BlockMask`` plus its element rule.

``torch.nn.attention.flex_attention`` is compiled once (``torch.compile``; inductor
generates C++ on the CPU and Triton on the GPU) and reused; each new shape costs one
compilation (seconds on a CPU), reported separately by ``attnkit speed``.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from .pattern import BlockPattern


def available() -> tuple[bool, str]:
    """Whether FlexAttention can run here, and why not."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as err:  # pragma: no cover - torch >= 2.6 has it
        return False, f"torch.nn.attention.flex_attention missing ({err})"
    return True, ""


@functools.lru_cache(maxsize=1)
def _compiled() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # Every (pattern, shape) compiles once; past dynamo's default limit of 8 it would
    # silently fall back to the unfused eager path, which builds the N x N scores.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
    return torch.compile(flex_attention, dynamic=False)


def to_block_mask(pattern: BlockPattern, batch: int, heads: int):
    """The pattern as a FlexAttention ``BlockMask`` for (batch, heads) queries."""
    from torch.nn.attention.flex_attention import BlockMask

    lists = pattern.kv_blocks
    nkb = pattern.num_kv_blocks
    counts = (lists >= 0).sum(-1).to(torch.int32)
    width = lists.shape[-1]
    indices = lists.clamp(min=0).to(torch.int32)
    if width < nkb:
        indices = torch.nn.functional.pad(indices, (0, nkb - width))
    else:
        indices = indices[..., :nkb]
    offset = pattern.q_offset
    rule = pattern.mask_mod
    nk = pattern.kv_len

    def mask_mod(b, h, q_idx, kv_idx):
        inside = kv_idx < nk
        if rule is None:
            return inside
        return inside & rule(b, h, q_idx + offset, kv_idx)

    return BlockMask.from_kv_blocks(
        counts.contiguous(),
        indices.contiguous(),
        BLOCK_SIZE=(pattern.block_q, pattern.block_k),
        mask_mod=mask_mod,
        seq_lengths=(pattern.q_len, pattern.kv_len),
    )


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, scale: float, compiled: bool = True,
    return_lse: bool = False,
):
    """Attention over the pattern with FlexAttention. q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D)
    -> out (B, Hq, Nq, D) [, lse (B, Hq, Nq) float32, with ``return_lse`` (not on the CPU)].

    FlexAttention writes 0 for a row without keys (and compiled CPU flex cannot return
    the log-sum-exp), so without lse the caller checks empty rows on the pattern first.
    """
    from torch.nn.attention.flex_attention import flex_attention as eager

    block_mask = to_block_mask(pattern, q.shape[0], q.shape[1])
    gqa = q.shape[1] != k.shape[1]
    fn = _compiled() if compiled else eager
    if return_lse:
        out, lse = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
        return out, lse.float() if q.dtype != torch.float64 else lse
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
