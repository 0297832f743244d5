"""compose: one policy compresses the prompt, another manages the cache while decoding.

Not a paper: attnkit's way to combine ideas, e.g. ``KVCache("compose", budget=256,
prefill="snapkv", decode="tova")`` (SnapKV's prompt selection, TOVA's eviction while
decoding) or ``decode="quest"`` (SnapKV-compressed prompt, Quest page selection at each
step). Rule: after a prefill pass the cache is compressed by ``prefill`` (with
``prefill_config``); during decode it is compressed by ``decode`` (with
``decode_config``) every ``interval`` steps once over budget, or — for a query-aware
``decode`` policy — each step attends to ``decode``'s selection. Both share the cache's
``budget``/``ratio``. Accumulating policies get every step's attention; their state must
not collide (they are separate policies, so use two different ones). Policies with their
own storage (``quantized``, ``zipcache``, ``think``) cannot be composed yet; eviction with
quantized storage is ``KVCache(policy, budget=..., kv_bits=8)`` (any evicting policy,
this one included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ...registry import policy_class, register
from .base import CachePolicy, LayerView


@register("compose", family="kv_cache", paper="attnkit composition of a prefill and a decode policy",
          arxiv="", year=2025, supports=("causal", "decode", "gqa"), kinds=("cache",))
class Compose(CachePolicy):
    """A prefill policy's compression, then a decode policy's eviction or selection."""

    @dataclass
    class Config:
        prefill: str = "snapkv"
        decode: str = "tova"
        prefill_config: dict = field(default_factory=dict)
        decode_config: dict = field(default_factory=dict)

    def check_config(self) -> None:
        c = self.config
        if "compose" in (c.prefill, c.decode):
            raise ValueError("compose: prefill and decode must be other policies")
        self.first: CachePolicy = policy_class(c.prefill)(**c.prefill_config)
        self.second: CachePolicy = policy_class(c.decode)(**c.decode_config)
        for part in (self.first, self.second):
            if part.mode == "store":
                raise ValueError(f"compose: {part.name!r} stores its tokens itself (quantized or pruned); "
                                 "it cannot be composed yet (to hold an evicting policy's tokens quantized, "
                                 "pass kv_bits=8 or 4 to KVCache)")
        if not self.first.evicts():
            raise ValueError(f"compose: prefill policy {c.prefill!r} evicts nothing")

    @property
    def default_when(self) -> str:  # type: ignore[override]
        return "both" if self.second.evicts() else "prefill"

    def selects(self) -> bool:
        return self.second.selects()

    def accumulates(self) -> bool:
        return self.first.accumulates() or self.second.accumulates()

    def obs_window(self) -> int:
        return max(self.first.obs_window(), self.second.obs_window())

    def _part(self, view: LayerView) -> CachePolicy:
        return self.first if view.phase == "prefill" else self.second

    def _windowed(self, view: LayerView, part: CachePolicy) -> LayerView:
        w = part.obs_window()
        if view.queries is None or w <= 0 or w >= view.queries.shape[2]:
            return view
        view.queries, view.query_positions = view.queries[:, :, -w:], view.query_positions[-w:]
        return view

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int) -> int:
        return self.first.layer_budget(budget, layer_idx, num_layers)

    def score(self, view: LayerView) -> torch.Tensor:
        part = self._part(view)
        return part.score(self._windowed(view, part))

    def select(self, scores: torch.Tensor, budget: torch.Tensor, view: LayerView) -> torch.Tensor:
        return self._part(view).select(scores, budget, view)

    def accumulate(self, view: LayerView, probs: torch.Tensor, query_positions: torch.Tensor) -> None:
        for part in (self.first, self.second):
            if part.accumulates():
                part.accumulate(view, probs, query_positions)

    def decode_select(self, view: LayerView, q: torch.Tensor, budget: int) -> Optional[torch.Tensor]:
        return self.second.decode_select(view, q, budget)
