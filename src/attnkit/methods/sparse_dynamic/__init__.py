"""Dynamic (content-aware) sparse prefill: an estimator picks blocks/columns/diagonals from q, k."""

from . import biformer, block_topk, flexprefill, hip, hyper, moba, pbs, routing, sea, vertical_slash  # noqa: F401
