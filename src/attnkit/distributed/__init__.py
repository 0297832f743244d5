"""Context parallelism over a ``torch.distributed`` process group (gloo on CPU, NCCL on
GPU): sharding layouts, ring attention, Ulysses, LASP-2 (linear attention) and
vertical-slash across shards. A layer around the methods: no method knows about process
groups. See docs/distributed.md.
"""

from .dynamic import vertical_slash_ring
from .lasp2 import lasp2
from .ring import ring_attention
from .sharding import LAYOUTS, check_same_length, padded_len, positions, shard, unshard
from .ulysses import ulysses_attention

__all__ = ["LAYOUTS", "check_same_length", "lasp2", "padded_len", "positions", "ring_attention", "shard",
           "ulysses_attention", "unshard", "vertical_slash_ring"]
