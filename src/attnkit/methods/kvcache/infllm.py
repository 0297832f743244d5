"""InfLLM: block memory units with representative keys; each decode step attends to the
sinks, the local window and the memory blocks most relevant to its query.

Paper: Xiao et al., "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an
Efficient Context Memory", arXiv:2402.04617 (2024). Rule: the tokens between the first
``sink`` (initial tokens) and the local window of the last ``recent`` tokens are split
into memory units (blocks) of ``block_size`` consecutive tokens; when a block is formed
(its tokens have all left the local window), its ``repr_tokens`` representative tokens
are the ones that receive the highest attention from the local queries (here: the
observation window of the last ``window`` queries, mean over those queries and over the
query heads of the KV head). At each decode step a block's relevance is the sum of q.k
over its representative keys (and over the query heads of the KV head); the top
``(budget - sink - recent) // block_size`` blocks are retrieved and attention runs over
sinks + retrieved blocks + local tokens (the local window, plus the tokens of a block not
yet complete, which stay local as in InfLLM). The full cache is kept (the paper offloads
the blocks to CPU memory; here they stay in the cache tensors): nothing is evicted,
``kept_positions`` is every token, ``budget`` is the tokens attended per step (the
incomplete block may add up to ``block_size - 1``). Prefill is exact attention; the
prompt's blocks are formed at the first decode step from the last ``window`` prompt
queries.

Defaults: the paper uses 128 initial tokens, a 4,096-token local window, blocks of 128
tokens with 4 representatives; attnkit's defaults (sink 4, recent 32, block 16, 4
representatives, window 32) fit budgets of 128-1024 tokens. Deviations: each KV head
retrieves its own blocks (the paper sums relevance over all heads of a layer); no CPU
offload or LRU GPU block cache; InfLLM's chunked prefill (which also retrieves blocks
inside the prompt) is replaced by exact prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...registry import register
from .base import CachePolicy, LayerView
from .common import group_mean, mask_state, ranks, window_probs

REPR, FORMED = "infllm_repr", "infllm_formed"


def block_ids(valid: torch.Tensor, sink: int, recent: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot: the index of its complete memory block (-1: sink, local or invalid), and
    the number of complete blocks per head (B, Hkv)."""
    rank, count = ranks(valid)
    n_blocks = ((count[..., 0] - sink - recent).clamp(min=0)) // size
    ids = torch.div(rank - sink, size, rounding_mode="floor")
    inside = valid & (rank >= sink) & (ids < n_blocks[..., None])
    return torch.where(inside, ids, -1), n_blocks


@register("infllm", family="kv_cache",
          paper="InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient Context Memory",
          arxiv="2402.04617", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class InfLLM(CachePolicy):
    """Keeps the full cache; each decode step attends to sinks + local window + the top
    memory blocks by q . representative keys."""

    mode = "select"

    @dataclass
    class Config:
        block_size: int = 16
        repr_tokens: int = 4
        sink: int = 4
        recent: int = 32
        window: int = 32

    def check_config(self) -> None:
        c = self.config
        for name in ("block_size", "repr_tokens", "window"):
            v = getattr(c, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"infllm: {name} must be a positive int, got {v!r}")
        for name in ("sink", "recent"):
            v = getattr(c, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"infllm: {name} must be an int >= 0, got {v!r}")
        if c.repr_tokens > c.block_size:
            raise ValueError(f"infllm: repr_tokens ({c.repr_tokens}) must be <= block_size ({c.block_size})")

    def obs_window(self) -> int:
        return self.config.window

    def score(self, view: LayerView) -> torch.Tensor:  # never evicts
        return view.positions.float()

    def form_blocks(self, view: LayerView, ids: torch.Tensor) -> None:
        """Pick the representatives of the blocks formed since the last step."""
        c = self.config
        formed = mask_state(view, FORMED)
        formed = torch.zeros_like(view.valid) if formed is None else formed
        new = (ids >= 0) & ~formed
        if not bool(new.any()):
            return
        if REPR not in view.state:
            view.state[REPR] = torch.zeros(view.valid.shape, dtype=view.keys.dtype, device=view.keys.device)
        score = group_mean(window_probs(view).mean(dim=2), view.keys.shape[1])  # (B, Hkv, L) in [0, 1]
        comp = torch.where(new, ids.to(score.dtype) * 4 - score, float("inf"))
        order = comp.argsort(dim=-1, stable=True)  # new blocks' slots first, grouped by block, best first
        inner = torch.arange(comp.shape[-1], device=comp.device) % c.block_size
        pick = (inner < c.repr_tokens) & torch.isfinite(comp.gather(-1, order))
        rep = torch.zeros_like(new).scatter(-1, order, pick)
        view.state[REPR] = torch.where(rep, 1.0, view.state[REPR]).to(view.keys.dtype)
        view.state[FORMED] = (formed | new).to(view.keys.dtype)

    def decode_select(self, view: LayerView, q: torch.Tensor, budget: int) -> Optional[torch.Tensor]:
        c = self.config
        valid = view.valid
        b, hkv, length = valid.shape
        ids, n_blocks = block_ids(valid, c.sink, c.recent, c.block_size)
        self.form_blocks(view, ids)  # blocks are formed even while the budget covers everything
        if int(valid.sum(dim=-1).max()) <= budget:
            return None
        rank, _ = ranks(valid)
        local = valid & (ids < 0) & (rank >= c.sink)  # recent window + incomplete block
        sinks = valid & (rank < c.sink)
        chosen = sinks | local
        n_sel = max(budget - c.sink - c.recent, 0) // c.block_size
        width = int(n_blocks.max())
        if n_sel == 0 or width == 0:
            return chosen
        g = q.shape[1] // hkv
        k = view.keys.repeat_interleave(g, dim=1) if g > 1 else view.keys
        dots = torch.matmul(q[:, :, -1:].to(k.dtype), k.transpose(2, 3))[:, :, 0].float()  # (B, Hq, L)
        dots = dots.view(b, hkv, g, length).sum(dim=2)
        rep = mask_state(view, REPR) & (ids >= 0)
        blocks = torch.zeros(b, hkv, width + 1, dtype=dots.dtype, device=dots.device)
        blocks.scatter_add_(-1, torch.where(rep, ids, width), dots.masked_fill(~rep, 0.0))
        blocks = blocks[..., :width]
        exists = torch.arange(width, device=dots.device) < n_blocks[..., None]
        blocks = blocks.masked_fill(~exists, float("-inf"))
        top = blocks.topk(min(n_sel, width), dim=-1).indices
        sel = torch.zeros(b, hkv, width + 1, dtype=torch.bool, device=dots.device).scatter(-1, top, True)
        sel[..., :width] &= exists
        picked = sel.gather(-1, torch.where(ids >= 0, ids, width))
        return (chosen | (picked & (ids >= 0))) & valid
