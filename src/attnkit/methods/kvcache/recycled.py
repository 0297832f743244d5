"""Recycled Attention: full attention every ``stride`` decode steps; in between, attend only
to the tokens the last full step attended to most.

Paper: Xu et al., "Recycled Attention: Efficient inference for long-context language
models", arXiv:2411.05787 (2024). Rule: decode step s (counted from the first decode step,
s = 0, 1, ...) runs full attention over the whole cache when ``s % stride == 0`` and keeps
the ``budget`` tokens with the highest attention of that step (the recycled cache);
every other step attends only to the recycled cache plus the tokens generated since that
full step. The full cache is kept (the full steps need it): nothing is evicted,
``kept_positions`` is every token, and ``budget`` is the recycled-cache size. Prefill is
exact attention.

attnkit's choices: GQA: the attention of the full step is averaged (mean) over the query
heads of each KV head, and each KV head keeps its own top-``budget`` tokens (the paper
describes one set per head). The step counter is per layer and restarts with a new cache.
The paper's default stride is not enforced; attnkit's default is 10 (the paper evaluates
strides 10 and 50).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ... import validate
from ...registry import register
from .base import CachePolicy, LayerView, topk_per_head
from .common import decode_probs, group_mean, mask_state

SEL = "recycled_sel"


@register("recycled", family="kv_cache",
          paper="Recycled Attention: Efficient inference for long-context language models",
          arxiv="2411.05787", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class Recycled(CachePolicy):
    """Keeps the full cache; full attention every ``stride`` steps, the last full step's
    top-``budget`` tokens (plus newer tokens) in between."""

    mode = "select"

    @dataclass
    class Config:
        stride: int = 10

    def __init__(self, config=None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.steps: dict[int, int] = {}  # layer -> decode steps run
        self.full_seen: dict[int, int] = {}  # layer -> tokens seen at the last full step

    def check_config(self) -> None:
        validate.check_positive(self.name, stride=self.config.stride)

    def score(self, view: LayerView) -> torch.Tensor:  # never evicts
        return view.positions.float()

    def decode_select(self, view: LayerView, q: torch.Tensor, budget: int) -> Optional[torch.Tensor]:
        layer = view.layer_idx
        step = self.steps.get(layer, 0)
        self.steps[layer] = step + 1
        prev = mask_state(view, SEL)
        if step % self.config.stride == 0 or prev is None:
            valid = view.valid
            if int(valid.sum(dim=-1).max()) <= budget:
                view.state[SEL] = valid.to(view.keys.dtype)
            else:
                probs = group_mean(decode_probs(view, q), view.keys.shape[1])  # (B, Hkv, L)
                top = topk_per_head(probs, torch.full((valid.shape[0],), budget, device=valid.device), valid)
                view.state[SEL] = top.to(view.keys.dtype)
            self.full_seen[layer] = view.seen
            return None  # the full step attends to everything
        newer = view.positions >= self.full_seen[layer]  # tokens generated since the full step
        return (prev | newer) & view.valid
