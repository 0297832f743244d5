"""The kernel layer: patterns, the backend choice, and the kernels that run them.

- ``pattern``: ``BlockPattern`` (block lists + element rule), the contract between a
  sparse method and the kernels; ``vertical_slash.VerticalSlashIndex`` and
  ``slots.KeySlots`` are the two patterns with kernels of their own; ``mixed.MixedIndex``
  runs some heads on a vertical-slash index and the others on a BlockPattern.
- ``backends``: ``choose_backend`` / ``compatible_backends`` / ``run`` — one chain of
  ``can_run_*`` predicates that say why a backend declines (logged at debug level).
- ``tiled``: every kernel but FlexAttention is a plan of fused calls run forward and
  backward by one executor (exact gradients, log-sum-exp, no Nq x Nk tensor).
- ``exact.attention_with_lse``: the one exact attention-with-lse function;
  ``merge.merge_partials``: the one log-sum-exp merge.
"""

from __future__ import annotations

from .backends import (
    BACKENDS,
    DENSE_MAX_ELEMS,
    Needs,
    as_block_pattern,
    choose_backend,
    compatible_backends,
    run,
)
from .block_sparse import check_no_empty_rows, count_allowed_pairs
from .exact import attention_with_lse
from .merge import merge_partials
from .pattern import BlockPattern, MaskMod, and_mods, causal_mod, lists_from_block_mask

__all__ = [
    "BACKENDS",
    "DENSE_MAX_ELEMS",
    "BlockPattern",
    "MaskMod",
    "Needs",
    "and_mods",
    "as_block_pattern",
    "attention_with_lse",
    "causal_mod",
    "check_no_empty_rows",
    "choose_backend",
    "compatible_backends",
    "count_allowed_pairs",
    "lists_from_block_mask",
    "merge_partials",
    "run",
]
