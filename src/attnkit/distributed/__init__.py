"""Context parallelism over a ``torch.distributed`` process group (gloo on CPU, NCCL on
GPU): sharding layouts, ring attention, Ulysses, LASP-2 (linear attention) and
vertical-slash across shards. A layer around the methods: no method knows about process
groups. At the model level (``attnkit.patch(model, context_parallel=group)``):
``shard_inputs`` and ``ShardedKVCache`` (they need ``transformers``; imported on first use).
See docs/distributed.md.
"""

from typing import Any

from .dynamic import vertical_slash_ring
from .lasp2 import lasp2
from .ring import ring_attention
from .sharding import LAYOUTS, check_same_length, padded_len, positions, shard, unshard
from .ulysses import ulysses_attention

__all__ = ["LAYOUTS", "ShardedKVCache", "check_same_length", "lasp2", "padded_len", "positions", "ring_attention",
           "shard", "shard_inputs", "ulysses_attention", "unshard", "vertical_slash_ring"]

_LAZY = {"shard_inputs": "model", "ShardedKVCache": "sharded_cache"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
