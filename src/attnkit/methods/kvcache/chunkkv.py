"""ChunkKV: keep whole chunks of tokens, chosen by their summed importance.

Paper: Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient
Long-Context LLM Inference", arXiv:2502.00299 (2025). Rule: the tokens are split into
consecutive chunks of ``chunk_size``; a chunk's score is the sum of its tokens' scores,
here SnapKV's observation-window votes (``window``, ``kernel``, ``pooling``; the window is
always kept, as in SnapKV); each KV head keeps the highest-scoring chunks, whole, until
its budget is full (the last chunk taken may be cut to fit the budget, by position).
Chunks are counted over each head's valid slots (padding never splits a chunk).
Deviations: the paper (and kvpress's ChunkKVPress) select the same chunks for all heads
of a layer; attnkit selects per KV head, like the rest of its policies; the paper's
layer-wise index reuse is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import validate
from ...registry import register
from .base import CachePolicy, LayerView
from .common import protect, ranks, window_slots
from .snapkv import POOLINGS, snapkv_votes


def chunk_select(scores: torch.Tensor, budget: torch.Tensor, valid: torch.Tensor, size: int) -> torch.Tensor:
    """(B, Hkv, L) bool: per head, whole chunks of ``size`` valid slots in decreasing
    order of summed score, until ``budget[b]`` slots are taken."""
    rank, count = ranks(valid)
    chunk = torch.where(valid, rank // size, 0)
    n_chunks = int(chunk.max()) + 1 if chunk.numel() else 1
    s = torch.where(valid, scores, torch.zeros_like(scores)).clamp(max=torch.finfo(scores.dtype).max)
    totals = torch.zeros(*scores.shape[:2], n_chunks, dtype=scores.dtype, device=scores.device)
    totals.scatter_add_(-1, chunk, s)
    exists = torch.arange(n_chunks, device=scores.device) <= (count - 1) // size  # (B, Hkv, C)
    totals = totals.masked_fill(~exists, float("-inf"))
    order = totals.argsort(dim=-1, descending=True, stable=True)
    chunk_rank = order.argsort(dim=-1)  # rank of each chunk by score
    sizes = torch.where(exists, torch.clamp(count - torch.arange(n_chunks, device=scores.device) * size, max=size), 0)
    ranked_sizes = sizes.gather(-1, order)
    before = ranked_sizes.cumsum(dim=-1) - ranked_sizes  # slots taken by better chunks
    start = before.gather(-1, chunk_rank)  # (B, Hkv, C)
    slot_order = start.gather(-1, chunk) + rank % size
    return valid & (slot_order < budget.view(-1, 1, 1))


@register("chunkkv", family="kv_cache",
          paper="ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference",
          arxiv="2502.00299", year=2025, supports=("causal", "decode", "gqa"), kinds=("cache",))
class ChunkKV(CachePolicy):
    """Whole chunks of tokens by summed SnapKV votes; the observation window kept."""

    @dataclass
    class Config:
        chunk_size: int = 10
        window: int = 32
        kernel: int = 7
        pooling: str = "max"

    def always_kept(self) -> tuple[int, str]:
        return self.config.window, f"observation window, window={self.config.window}"

    def check_config(self) -> None:
        c = self.config
        validate.check_positive(self.name, chunk_size=c.chunk_size, window=c.window, kernel=c.kernel)
        if c.pooling not in POOLINGS:
            raise ValueError(f"chunkkv: pooling must be one of {POOLINGS}, got {c.pooling!r}")

    def obs_window(self) -> int:
        return self.config.window

    def score(self, view: LayerView) -> torch.Tensor:
        votes = snapkv_votes(view, self.config.kernel, self.config.pooling)
        return protect(votes, window_slots(view))

    def select(self, scores: torch.Tensor, budget: torch.Tensor, view: LayerView) -> torch.Tensor:
        # the window first (its votes are +inf), then chunks by summed votes
        return _window_then_chunks(scores, budget, view, self.config.chunk_size)


def _window_then_chunks(scores: torch.Tensor, budget: torch.Tensor, view: LayerView, size: int) -> torch.Tensor:
    win = torch.isinf(scores) & view.valid
    from_end = win.flip(-1).long().cumsum(-1).flip(-1)  # 1 for a head's newest window slot
    win = win & (from_end <= budget.view(-1, 1, 1))  # a window larger than the budget: its newest
    left = (budget.view(-1, 1) - win.sum(dim=-1)).clamp(min=0)  # (B, Hkv)
    valid = view.valid & ~win
    out = torch.zeros_like(win)
    for h in range(scores.shape[1]):  # per head: its own remaining budget (heads alike here)
        out[:, h] = chunk_select(scores[:, h:h + 1], left[:, h], valid[:, h:h + 1], size)[:, 0]
    return out | win
