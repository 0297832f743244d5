"""ThinK: query-driven pruning of key channels (the cache gets thinner, not shorter).

Paper: Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv:2407.21018
(2024). Rule (the official code's ``key_pruner_query_driven``): after the prompt, score each
key channel j of a head by ``mean_w q[:, j]^2 * mean_t k[:, j]^2`` (the last ``window`` = 32
queries, all tokens), remove the ``int(D * pruning_ratio)`` lowest-scoring channels from
the keys of every token except the most recent ``recent``; the keys of tokens that arrive
later are kept whole. Attention then uses q.k over the kept channels for pruned tokens,
i.e. exact attention with the pruned channels of those keys set to zero. Values are not
touched. Nothing is evicted and there is no budget (``KVCache("think", pruning_ratio=0.4)``).

Defaults are the official evaluation script's (``pruning_ratio=0.4``, ``recent_size=32``,
query window 32; the function's own defaults are 0.3 / 128). Storage is real: pruned keys
are held compactly, (B, Hkv, L_pruned, D - pruned) plus the kept channel indices per
(row, KV head), so ``KVCache.nbytes()`` shows the saving; the full-width read-out (zeros in
the pruned channels) exists only during the layer's attention.

Deviations (deliberate):
- GQA: channels are chosen per KV head, with the query statistic ``mean_w q^2`` averaged over
  the query heads of that KV head (the official code repeats the keys per query head and
  prunes each copy separately, which stores Hq / Hkv copies).
- Padding tokens (empty slots) are left out of the key statistic, so each row of a padded
  batch chooses as if it were alone.
- The channels are chosen once per layer, at the first prompt forward pass; a chunked
  prefill (or a later prompt) prunes the keys that have left the ``recent`` window with the
  same channels (the official code prunes one full-prompt forward pass only).
- ThinK alone (the paper combines it with SnapKV/H2O token eviction); storage policies
  cannot be combined through ``compose`` yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...registry import register
from .base import CachePolicy, LayerView, nbytes_of
from .common import group_mean


def channel_scores(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """(B, Hkv, D) ThinK score of each key channel: ``mean q^2`` of the last ``window``
    queries q: (B, Hq, T, D) (mean over each KV head's query heads) times ``mean k^2`` over
    the valid tokens of keys: (B, Hkv, L, D) (valid: (B, Hkv, L) bool)."""
    dtype = torch.promote_types(keys.dtype, torch.float32)
    q2 = group_mean(q[:, :, -window:].to(dtype).pow(2).mean(dim=2), keys.shape[1])
    w = valid[..., None].to(dtype)
    k2 = (keys.to(dtype).pow(2) * w).sum(dim=2) / w.sum(dim=2).clamp(min=1)
    return q2 * k2


def kept_channels(scores: torch.Tensor, pruned: int) -> torch.Tensor:
    """(B, Hkv, D - pruned) long, sorted: the channels left once the ``pruned`` lowest go."""
    d = scores.shape[-1]
    return scores.topk(d - pruned, dim=-1).indices.sort(dim=-1).values


class ThinKStore:
    """One layer's keys: pruned tokens (B, Hkv, Lp, Dk) + their kept channel indices
    (B, Hkv, Dk), then whole keys (B, Hkv, Lf, D); values whole (B, Hkv, L, D)."""

    def __init__(self, ratio: float, window: int, recent: int) -> None:
        self.ratio, self.window, self.recent = ratio, window, recent
        self.k_pruned: torch.Tensor | None = None
        self.channels: torch.Tensor | None = None  # (B, Hkv, Dk) long, fixed at the first prompt
        self.k_full: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_full = k if self.k_full is None else torch.cat([self.k_full, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_pruned is None:
            return self.k_full, self.values
        b, h, lp, dk = self.k_pruned.shape
        whole = self.k_pruned.new_zeros(b, h, lp, self.k_full.shape[-1])
        whole.scatter_(-1, self.channels[:, :, None, :].expand(b, h, lp, dk), self.k_pruned)
        return torch.cat([whole, self.k_full], dim=2), self.values

    def observe(self, view: LayerView, q: torch.Tensor, query_positions: torch.Tensor) -> None:
        """After a prompt forward pass (T > 1): choose the channels (first time), then prune
        the whole keys that have left the ``recent`` window."""
        if q.shape[2] <= 1:
            return  # decode: new keys stay whole
        if self.channels is None:
            scores = channel_scores(q, view.keys, view.valid, self.window)
            self.channels = kept_channels(scores, int(view.keys.shape[-1] * self.ratio))
        m = self.k_full.shape[2] - self.recent
        if m <= 0:
            return
        b, h = self.k_full.shape[:2]
        dk = self.channels.shape[-1]
        cut = self.k_full[:, :, :m].gather(-1, self.channels[:, :, None, :].expand(b, h, m, dk))
        self.k_pruned = cut if self.k_pruned is None else torch.cat([self.k_pruned, cut], dim=2)
        self.k_full = self.k_full[:, :, m:].clone()  # a copy: a slice would keep the old storage alive

    def nbytes(self) -> int:
        return nbytes_of([self.k_pruned, self.channels, self.k_full, self.values])

    def apply_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in ("k_pruned", "channels", "k_full", "values"):
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, fn(x))


@register("think", family="kv_cache", paper="ThinK: Thinner Key Cache by Query-Driven Pruning",
          arxiv="2407.21018", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class ThinK(CachePolicy):
    """Prunes the least query-relevant key channels of the prompt's keys (all but the
    ``recent`` newest tokens); no eviction, no budget."""

    mode = "store"

    @dataclass
    class Config:
        pruning_ratio: float = 0.4
        window: int = 32
        recent: int = 32

    def check_config(self) -> None:
        c = self.config
        if not 0 <= c.pruning_ratio < 1:
            raise ValueError(f"think: pruning_ratio must be in [0, 1) (fraction of key channels removed), "
                             f"got {c.pruning_ratio!r}")
        if not isinstance(c.window, int) or c.window < 1:
            raise ValueError(f"think: window must be a positive int (queries scoring the channels), got {c.window!r}")
        if not isinstance(c.recent, int) or c.recent < 0:
            raise ValueError(f"think: recent must be an int >= 0 (newest tokens whose keys stay whole), "
                             f"got {c.recent!r}")

    def make_store(self, layer_idx: int) -> ThinKStore:
        return ThinKStore(self.config.pruning_ratio, self.config.window, self.config.recent)
