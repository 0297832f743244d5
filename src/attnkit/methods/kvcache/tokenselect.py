"""TokenSelect: per-head soft-vote token selection over the full cache at each decode step.

Paper: Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation
for LLMs via Dynamic Token-Level KV Cache Selection", arXiv:2411.02886 (2024). Rule: at
each decode step the query scores every cached token by q.k; the scores of each head are
softmax-normalised (so no single head dominates the vote) and summed over heads (soft
vote); attention runs over the top-``budget`` voted tokens. Selection Cache: consecutive
decode queries are very similar, so when the cosine similarity of the current query and
the query that last ran a selection exceeds ``threshold``, the previous selection is
reused (plus the tokens generated since) instead of recomputed.

The full cache is kept: nothing is evicted, ``kept_positions`` is every token, and
``budget`` is the number of tokens attended per step. Prefill is exact attention.

attnkit's choices / deviations: the vote is per KV head, summing the softmaxed q.k of the
query heads of that KV head (each KV head selects its own tokens; the paper's kernels
vote over the heads sharing a selection). The first ``sink`` and the last ``recent``
tokens of each head are always attended (the reference code, built on InfLLM's, keeps
initial and local tokens; the newest token is always attended); they count in the budget.
The Selection Cache compares, per batch row and KV head, the concatenation of its query
heads (cosine similarity), and the query kept for the comparison is the one of the last
recomputed selection. The per-layer query kept for the Selection Cache is not reordered
by beam search (a reorder only changes whether a selection is reused). No paged
dot-product kernel: scores are computed in PyTorch over the whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ...registry import register
from .base import CachePolicy, LayerView
from .common import decode_probs, mask_state, protect, recent_mask, sink_mask, top_slots

SEL = "tokenselect_sel"


def soft_vote(view: LayerView, q: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, L): per query head softmax(q.k), summed over the query heads of each KV head."""
    probs = decode_probs(view, q)
    b, hq, length = probs.shape
    hkv = view.keys.shape[1]
    return probs.view(b, hkv, hq // hkv, length).sum(dim=2)


@register("tokenselect", family="kv_cache",
          paper="TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via Dynamic "
                "Token-Level KV Cache Selection",
          arxiv="2411.02886", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class TokenSelect(CachePolicy):
    """Keeps the full cache; each decode step attends to the top soft-voted tokens per head."""

    mode = "select"

    @dataclass
    class Config:
        sink: int = 4
        recent: int = 16
        threshold: float = 0.9  # Selection Cache: reuse when cos(q, q_prev) > threshold (> 1: never)

    def __init__(self, config=None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.last_query: dict[int, torch.Tensor] = {}  # layer -> (B, Hkv, G*D) query of the last selection
        self.reused = 0
        self.recomputed = 0

    def always_kept(self) -> tuple[int, str]:
        c = self.config
        return c.sink + max(c.recent, 1), f"sinks and recent tokens, sink={c.sink} + recent={c.recent}"

    def check_config(self) -> None:
        c = self.config
        for name in ("sink", "recent"):
            v = getattr(c, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"tokenselect: {name} must be an int >= 0, got {v!r}")
        if isinstance(c.threshold, bool) or not isinstance(c.threshold, (int, float)):
            raise ValueError(f"tokenselect: threshold must be a number (cosine similarity), got {c.threshold!r}")

    def score(self, view: LayerView) -> torch.Tensor:  # never evicts
        return view.positions.float()

    def decode_select(self, view: LayerView, q: torch.Tensor, budget: int) -> Optional[torch.Tensor]:
        valid = view.valid
        b, hkv, length = valid.shape
        if int(valid.sum(dim=-1).max()) <= budget:
            self.last_query.pop(view.layer_idx, None)
            view.state.pop(SEL, None)
            return None
        qh = q[:, :, -1].reshape(b, hkv, -1).float()  # (B, Hkv, G*D)
        always = sink_mask(view, self.config.sink) | recent_mask(view, max(self.config.recent, 1))
        prev_q, prev_sel = self.last_query.get(view.layer_idx), mask_state(view, SEL)
        if prev_q is not None and prev_sel is not None and prev_q.shape == qh.shape:
            reuse = F.cosine_similarity(qh, prev_q, dim=-1) > self.config.threshold  # (B, Hkv)
        else:
            reuse = torch.zeros(b, hkv, dtype=torch.bool, device=valid.device)
        if bool(reuse.all()):
            self.reused += 1
            chosen = prev_sel | recent_mask(view, 1)  # the previous selection plus the new token
        else:
            self.recomputed += 1
            votes = protect(soft_vote(view, q), always)
            fresh = top_slots(votes, budget, valid)
            chosen = fresh if prev_sel is None else torch.where(reuse[..., None], prev_sel | recent_mask(view, 1), fresh)
            self.last_query[view.layer_idx] = torch.where(reuse[..., None], prev_q, qh) if prev_q is not None and \
                prev_q.shape == qh.shape else qh
        chosen = chosen & valid
        view.state[SEL] = chosen.to(view.keys.dtype)
        return chosen
