"""StreamingLLM as a KV-cache policy: attention sinks + the most recent tokens.

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
arXiv:2309.17453 (2023). Rule: keep the first ``sink`` tokens of each sequence and the
``budget - sink`` most recent ones; evict everything else, after prefill and at every
decode step. Deviation: the paper re-numbers positions inside the cache; attnkit keeps
every key's original RoPE position (as kvpress's StreamingLLMPress does).
The same idea as a prefill attention pattern is ``methods/sparse_static/streaming.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import validate
from ...registry import register
from .base import CachePolicy, LayerView
from .common import protect, sink_mask


@register("streaming", family="kv_cache", paper="Efficient Streaming Language Models with Attention Sinks",
          arxiv="2309.17453", year=2023, supports=("causal", "decode", "gqa"), kinds=("cache",))
class StreamingPolicy(CachePolicy):
    """Keep the first `sink` tokens and the most recent ones."""

    default_when = "both"

    @dataclass
    class Config:
        sink: int = 4

    def always_kept(self) -> tuple[int, str]:
        return self.config.sink, f"attention sinks, sink={self.config.sink}"

    def check_config(self) -> None:
        validate.check_positive(self.name, sink=self.config.sink)

    def score(self, view: LayerView) -> torch.Tensor:
        recency = view.positions.float()
        return protect(recency, sink_mask(view, self.config.sink))
