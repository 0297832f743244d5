"""Ada-KV: head-adaptive budgets around any scoring policy.

Paper: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation
for Efficient LLM Inference", arXiv:2407.11550 (2024). Rule: the layer's total budget
(budget x KV heads) goes to the highest scores across all heads of the layer, so heads
keep different numbers of tokens; a safeguard first gives each head its top
``alpha_safeguard * budget`` tokens. The scores come from ``scorer`` (default SnapKV).
attnkit stores the per-head sets for real (no kvpress "fake keys").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...registry import policy_class, register
from .base import CachePolicy, LayerView, topk_per_head


@register("adakv", family="kv_cache",
          paper="Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference",
          arxiv="2407.11550", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class AdaKV(CachePolicy):
    """Budget shared across the heads of a layer by score (per-head budgets)."""

    @dataclass
    class Config:
        scorer: str = "snapkv"
        alpha_safeguard: float = 0.2
        scorer_config: dict = field(default_factory=dict)

    def check_config(self) -> None:
        if not 0 <= self.config.alpha_safeguard <= 1:
            raise ValueError(f"adakv: alpha_safeguard must be in [0, 1], got {self.config.alpha_safeguard}")
        if self.config.scorer == "adakv":
            raise ValueError("adakv: scorer must be another policy")
        self.inner: CachePolicy = policy_class(self.config.scorer)(**self.config.scorer_config)
        if not self.inner.evicts():
            raise ValueError(f"adakv: scorer {self.config.scorer!r} does not evict (mode {self.inner.mode!r}); "
                             "it has no scores to share")

    @property
    def default_when(self) -> str:  # type: ignore[override]
        return self.inner.default_when

    def accumulates(self) -> bool:
        return self.inner.accumulates()

    def obs_window(self) -> int:
        return self.inner.obs_window()

    def accumulate(self, view: LayerView, probs: torch.Tensor, query_positions: torch.Tensor) -> None:
        self.inner.accumulate(view, probs, query_positions)

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int) -> int:
        return self.inner.layer_budget(budget, layer_idx, num_layers)

    def score(self, view: LayerView) -> torch.Tensor:
        return self.inner.score(view)

    def select(self, scores: torch.Tensor, budget: torch.Tensor, view: LayerView) -> torch.Tensor:
        return adaptive_select(scores, budget, view.valid, self.config.alpha_safeguard)


def adaptive_select(scores: torch.Tensor, budget: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B, Hkv, L) bool: per row b, ``budget[b] * Hkv`` slots of the layer, each head at
    least its top ``int(alpha * budget[b])``, the rest by score across heads."""
    b, h, length = scores.shape
    scores = scores.masked_fill(~valid, float("-inf"))
    floor = (budget.float() * alpha).long()
    keep = topk_per_head(scores, floor, valid)
    rest = scores.masked_fill(keep, float("-inf")).reshape(b, h * length)
    extra = (budget * h - keep.reshape(b, -1).sum(dim=-1)).clamp(min=0)
    k = min(int(extra.max()), h * length)
    if k > 0:
        top = rest.topk(k, dim=-1)
        chosen = torch.arange(k, device=scores.device)[None, :] < extra[:, None]
        chosen = chosen & torch.isfinite(top.values) | chosen & (top.values == float("inf"))
        more = torch.zeros(b, h * length, dtype=torch.bool, device=scores.device)
        more.scatter_(-1, top.indices, chosen)
        keep = keep | more.view(b, h, length)
    return keep & valid
