"""DuoAttention: retrieval heads keep the full cache, streaming heads sinks + recent.

Paper: Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads", arXiv:2410.10819 (2024). Rule: each KV head is a retrieval head
(full cache, never evicted) or a streaming head (the first ``sink`` tokens plus the most
recent ones, ``budget`` in all — StreamingLLM); streaming heads evict after prefill and
while decoding.

Head roles: ``plan`` — a JSON file path or a dict ``{layer: [1 = retrieval, 0 = streaming
per KV head]}`` (e.g. produced by the analysis tools or by DuoAttention's own
optimisation); layers the plan does not list are all streaming. Without a plan,
``retrieval_ratio`` of each layer's KV heads (rounded) become retrieval heads, chosen by
an attention heuristic on the observation window (the paper learns the roles by
optimisation on synthetic passkey data: ``attnkit.analysis.train_duo_gates`` and
``duo_plan`` do that and give this ``plan``): a head's share of attention
mass, from its last ``window`` prompt queries averaged over its query heads, that falls
outside its sinks and recent window — heads that look far back are retrieval heads. The
roles of a layer are fixed at its first compression (averaged over batch rows).
Memory: retrieval heads hold every token, so ``budget`` bounds only streaming heads; the
cache stores each head's own tokens (``attnkit.kvcache_ragged``), so streaming heads hold
only their budget.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ... import validate
from ...registry import register
from .base import CachePolicy, LayerView, topk_per_head
from .common import group_mean, protect, recent_mask, sink_mask, window_probs


def load_plan(plan: Any) -> Optional[dict[int, list[int]]]:
    """A plan (None, dict or JSON file path) -> {layer: [0/1 per KV head]}."""
    if plan is None:
        return None
    if isinstance(plan, (str, os.PathLike)):
        with open(plan, encoding="utf-8") as f:
            plan = json.load(f)
    if not isinstance(plan, dict):
        raise ValueError(f"duo: plan must be a dict or a JSON file of {{layer: [0/1 per KV head]}}, got {plan!r}")
    out = {}
    for layer, roles in plan.items():
        if not all(r in (0, 1, True, False) for r in roles):
            raise ValueError(f"duo: plan roles must be 0 (streaming) or 1 (retrieval), layer {layer}: {roles!r}")
        out[int(layer)] = [int(r) for r in roles]
    return out


@register("duo", family="kv_cache",
          paper="DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads",
          arxiv="2410.10819", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class DuoAttention(CachePolicy):
    """Retrieval heads keep the full cache; streaming heads keep sinks + recent (budget)."""

    default_when = "both"

    @dataclass
    class Config:
        plan: Any = None
        retrieval_ratio: float = 0.25
        sink: int = 4
        window: int = 32

    def always_kept(self) -> tuple[int, str]:
        return self.config.sink, f"attention sinks of streaming heads, sink={self.config.sink}"

    def check_config(self) -> None:
        validate.check_positive(self.name, sink=self.config.sink, window=self.config.window)
        if not 0 <= self.config.retrieval_ratio <= 1:
            raise ValueError(f"duo: retrieval_ratio must be in [0, 1], got {self.config.retrieval_ratio}")
        self.plan = load_plan(self.config.plan)
        self.roles: dict[int, torch.Tensor] = {}

    def obs_window(self) -> int:
        return 0 if self.plan is not None else self.config.window

    def head_roles(self, view: LayerView) -> torch.Tensor:
        """(Hkv,) bool: True for retrieval heads of this layer (fixed once computed)."""
        hkv = view.positions.shape[1]  # not view.keys: in ragged storage the keys are built only if read
        if view.layer_idx in self.roles:
            return self.roles[view.layer_idx]
        if self.plan is not None:
            roles = self.plan.get(view.layer_idx, [0] * hkv)
            if len(roles) != hkv:
                raise ValueError(f"duo: plan gives {len(roles)} roles for layer {view.layer_idx}, which has {hkv} "
                                 "KV heads")
            out = torch.tensor(roles, dtype=torch.bool, device=view.positions.device)
        else:
            out = torch.zeros(hkv, dtype=torch.bool, device=view.positions.device)
            n = int(self.config.retrieval_ratio * hkv + 0.5)
            if n > 0:
                out[far_attention_share(view, self.config.sink).topk(n).indices] = True
        self.roles[view.layer_idx] = out
        return out

    def score(self, view: LayerView) -> torch.Tensor:
        recency = view.positions.float()
        return protect(recency, sink_mask(view, self.config.sink))

    def select(self, scores: torch.Tensor, budget: torch.Tensor, view: LayerView) -> torch.Tensor:
        retrieval = self.head_roles(view)[None, :, None]
        return torch.where(retrieval, view.valid, topk_per_head(scores, budget, view.valid))


def far_attention_share(view: LayerView, sink: int) -> torch.Tensor:
    """(Hkv,) mean attention mass of the window queries outside sinks + recent budget."""
    probs = group_mean(window_probs(view), view.keys.shape[1]).mean(dim=2)  # (B, Hkv, L)
    near = sink_mask(view, sink) | recent_mask(view, max(view.budget - sink, 0))
    return probs.masked_fill(near, 0.0).sum(dim=-1).mean(dim=0)
