"""Quest: query-aware page selection over the full cache at each decode step.

Paper: Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference", arXiv:2406.10774 (2024). Rule: the cache is split into pages of
``page_size`` consecutive tokens; each page keeps the per-channel minimum ``m`` and
maximum ``M`` of its keys. At each decode step the query ``q`` scores every page with the
upper bound of its q.k, ``sum_c max(q_c * m_c, q_c * M_c)``, and attends only to the
tokens of the top ``budget // page_size`` pages (at least one). The full cache is kept:
nothing is evicted, ``kept_positions`` is every token, and ``budget`` is the number of
tokens attended per step. Prefill is exact attention.

attnkit's choices: the page holding the newest token is always selected (it is partially
filled and holds the current token; the Quest kernels always attend to it); as in the
paper, the first ``skip_layers`` layers (default 2) attend to everything. GQA: page
scores are averaged over the query heads of each KV head (Quest is for MHA), so each KV
head selects its own pages. Pages are slot ranges (padding slots are never attended; a
page with no valid slot is never selected). The page min/max are recomputed from the
keys at each step instead of maintained incrementally (same values, O(L x D) like a
read of the keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ... import validate
from ...registry import register
from .base import CachePolicy, LayerView


def page_bounds(keys: torch.Tensor, valid: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per page of ``page`` slots: (min (B, H, P, D), max (B, H, P, D), page has a valid slot (B, H, P))."""
    b, h, length, d = keys.shape
    pad = (-length) % page
    k = F.pad(keys, (0, 0, 0, pad))
    ok = F.pad(valid, (0, pad))
    n = (length + pad) // page
    k, ok = k.view(b, h, n, page, d), ok.view(b, h, n, page, 1)
    lo = k.masked_fill(~ok, float("inf")).amin(dim=3)
    hi = k.masked_fill(~ok, float("-inf")).amax(dim=3)
    any_ok = ok[..., 0].any(dim=-1)
    lo = lo.masked_fill(~any_ok[..., None], 0.0)
    hi = hi.masked_fill(~any_ok[..., None], 0.0)
    return lo, hi, any_ok


def page_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """q: (B, Hq, D) -> (B, Hq, P) upper bounds sum_c max(q_c lo_c, q_c hi_c) per page
    (lo/hi (B, Hkv, P, D) are shared by each KV head's query heads)."""
    g = q.shape[1] // lo.shape[1]
    lo, hi = lo.repeat_interleave(g, dim=1), hi.repeat_interleave(g, dim=1)
    qe = q[:, :, None, :].to(lo.dtype)
    return torch.maximum(qe * lo, qe * hi).sum(dim=-1)


@register("quest", family="kv_cache", paper="Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
          arxiv="2406.10774", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class Quest(CachePolicy):
    """Keeps the full cache; each decode step attends to the top pages by min/max key bounds."""

    mode = "select"

    @dataclass
    class Config:
        page_size: int = 16
        skip_layers: int = 2

    def check_config(self) -> None:
        validate.check_positive(self.name, page_size=self.config.page_size)
        if not isinstance(self.config.skip_layers, int) or self.config.skip_layers < 0:
            raise ValueError(f"quest: skip_layers must be an int >= 0, got {self.config.skip_layers!r}")

    def held_tensors(self, layer_idx: int) -> list:
        return list(getattr(self, "_pages", {}).get(layer_idx, ())[1:])

    def _bounds(self, view: LayerView, valid: torch.Tensor, ps: int):
        """Page bounds (lo, hi, any_ok) of ``page_bounds``, kept per layer between decode
        steps: a step that appended one slot recomputes only the last page (O(ps D), not a
        pass over every key). Anything else (a prefill, a reorder) recomputes them all."""
        if not hasattr(self, "_pages"):
            self._pages: dict = {}
        length = valid.shape[-1]
        held = self._pages.get(view.layer_idx)
        if held is None or held[0] != length - 1 or held[1].shape[:2] != valid.shape[:2]:
            lo, hi, ok = page_bounds(view.keys, valid, ps)
        else:
            _, lo, hi, ok = held
            page = (length - 1) // ps
            lo_p, hi_p, ok_p = page_bounds(view.keys[:, :, page * ps:], valid[:, :, page * ps:], ps)
            if page == lo.shape[2]:  # the new slot opened a page
                lo, hi, ok = torch.cat([lo, lo_p], 2), torch.cat([hi, hi_p], 2), torch.cat([ok, ok_p], 2)
            else:
                lo[:, :, page], hi[:, :, page], ok[:, :, page] = lo_p[:, :, 0], hi_p[:, :, 0], ok_p[:, :, 0]
        self._pages[view.layer_idx] = (length, lo, hi, ok)
        return lo, hi, ok

    def score(self, view: LayerView) -> torch.Tensor:  # never evicts
        return view.positions.float()

    def decode_select(self, view: LayerView, q: torch.Tensor, budget: int) -> Optional[torch.Tensor]:
        if view.layer_idx < self.config.skip_layers:
            return None
        ps = self.config.page_size
        valid = view.valid
        b, hkv, length = valid.shape
        lo, hi, any_ok = self._bounds(view, valid, ps)
        n_pages = lo.shape[2]
        k = max(1, budget // ps)
        if k >= n_pages:
            return None
        scores = page_scores(q[:, :, -1], lo, hi)  # (B, Hq, P)
        scores = scores.view(b, hkv, -1, n_pages).mean(dim=2)
        scores = scores.masked_fill(~any_ok, float("-inf"))
        # the page of each head's newest valid slot is always attended
        slot = torch.arange(length, device=valid.device)
        newest = torch.where(valid, slot, -1).amax(dim=-1)  # (B, Hkv)
        last_page = (newest.clamp(min=0) // ps)[..., None]
        scores = scores.scatter(-1, last_page, float("inf"))
        top = scores.topk(k, dim=-1).indices
        pages = torch.zeros(b, hkv, n_pages, dtype=torch.bool, device=valid.device).scatter(-1, top, True)
        pages = pages & any_ok
        return pages.repeat_interleave(ps, dim=-1)[..., :length] & valid
