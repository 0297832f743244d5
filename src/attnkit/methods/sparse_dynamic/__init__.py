"""Dynamic (content-aware) sparse prefill: an estimator picks blocks/columns/diagonals from q, k."""

from . import (  # noqa: F401
    biformer,
    block_topk,
    flexprefill,
    hip,
    hyper,
    minference,
    minference_block,
    moba,
    pbs,
    routing,
    sea,
    vertical_slash,
)
