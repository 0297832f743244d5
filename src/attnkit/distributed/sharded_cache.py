"""``ShardedKVCache``: the KV cache of a context-parallel model, sharded across the ranks.

After a context-parallel prefill (``attnkit.patch(model, context_parallel=group)``, each
rank running the model on its shard of the prompt) every rank keeps the K/V of the
positions it computed, padding dropped: nothing is gathered. Decoding runs the same new
token on every rank; each rank attends over its own slots and the partial results merge
by log-sum-exp (``distributed.model``). The K/V of the token at global position p
(p >= the prompt length N) is stored on ONE rank, ``(p - N) % R`` (round robin from group
rank 0), so the decoded tokens spread evenly; a call of T > 1 tokens stores them all on
the rank of its first position.

The attention function learns what a layer's ``update`` returned from a tag on the key
tensor (``decode_tag``): untagged keys are a prefill shard (the ring runs over them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from transformers.cache_utils import Cache, DynamicLayer

from .sharding import padded_len, positions

DECODE_ATTR = "_attnkit_cp_decode"  # on the key tensor a decode step's update returned


@dataclass(frozen=True)
class DecodeTag:
    """What a decode step's keys are: this rank's slots, and whether the T new tokens
    (the last T slots) are among them (then they attend causally among themselves)."""

    owner: bool
    new_tokens: int


def decode_tag(keys: torch.Tensor) -> Optional[DecodeTag]:
    """The tag of keys returned by a ``ShardedKVCache`` decode step, or None (a prefill)."""
    return getattr(keys, DECODE_ATTR, None)


class _ShardedLayer(DynamicLayer):
    """One layer's slots on this rank: (B, Hkv, L, D) keys and values, L = this rank's real
    prompt positions plus the decoded tokens stored here."""

    def __init__(self, cache: "ShardedKVCache") -> None:
        super().__init__()
        self.cache = cache
        self.decoded = 0  # tokens decoded after the prompt (on every rank, stored here or not)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        if not self.is_initialized:  # the prefill: this rank's whole shard, padding included
            if key_states.shape[2] != cache.shard_len:
                raise ValueError(f"the prefill through a ShardedKVCache is this rank's whole shard of "
                                 f"{cache.shard_len} positions (akd.shard_inputs of {cache.total_len} tokens at "
                                 f"{cache.world} ranks, {cache.layout}); got {key_states.shape[2]}")
            self.lazy_initialization(key_states, value_states)
            keep = cache.keep.to(key_states.device)
            self.keys, self.values = key_states.index_select(2, keep), value_states.index_select(2, keep)
            return key_states, value_states  # the ring needs the equal-length shards
        t = key_states.shape[2]
        owner = cache.owner(cache.total_len + self.decoded) == cache.rank
        self.decoded += t
        if owner:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        keys = self.keys.view_as(self.keys)  # a fresh tensor object to carry this step's tag
        setattr(keys, DECODE_ATTR, DecodeTag(owner, t))
        return keys, self.values

    def get_seq_length(self) -> int:
        """Tokens seen across all ranks (positions derive from it), not the slots held here."""
        return self.cache.total_len + self.decoded if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0  # the model's mask is not used under context parallel


class ShardedKVCache(Cache):
    """A ``transformers.Cache`` holding this rank's part of the KV cache.

    ``total_len``: the prompt length N before ``shard_inputs`` padded it; ``group`` and
    ``layout``: those of the patch and of ``shard_inputs``. The first forward through the
    cache must be the context-parallel prefill of this rank's whole shard; every later
    forward is a decode step run alike on every rank (``position_ids`` may be left out:
    ``get_seq_length`` counts the tokens seen across all ranks).

    Per layer this rank holds the K/V of its real prompt positions (about N / R) and of
    every R-th decoded token: ``nbytes()`` of the whole sequence's cache over R.
    """

    def __init__(self, total_len: int, group: Any = None, layout: str = "zigzag") -> None:
        Cache.__init__(self, layers=[])
        if total_len < 1:
            raise ValueError(f"total_len must be >= 1 (the prompt length), got {total_len}")
        self.group, self.layout, self.total_len = group, layout, int(total_len)
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        padded_len(total_len, self.world, layout)  # checks the layout
        pos = positions(self.rank, self.world, total_len, layout)
        self.shard_len = pos.numel()
        self.keep = torch.nonzero(pos < total_len).flatten()  # this rank's slots of real positions

    def owner(self, position: int) -> int:
        """The group rank that stores the decoded token at global ``position`` (>= total_len)."""
        return (position - self.total_len) % self.world

    def _layer(self, idx: int) -> _ShardedLayer:
        while len(self.layers) <= idx:
            self.layers.append(_ShardedLayer(self))
        return self.layers[idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._layer(layer_idx).update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._layer(layer_idx).get_seq_length() if self.layers else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._layer(layer_idx).get_mask_sizes(query_length)

    def slots(self, layer_idx: int = 0) -> int:
        """K/V positions this rank holds for a layer."""
        layer = self._layer(layer_idx)
        return layer.keys.shape[2] if layer.is_initialized else 0

    def nbytes(self) -> int:
        """Bytes of keys and values this rank holds, all layers."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))
