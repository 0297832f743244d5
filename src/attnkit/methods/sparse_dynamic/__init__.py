"""Dynamic (content-aware) sparse prefill: an estimator picks blocks/columns/diagonals from q, k."""

from . import flexprefill, vertical_slash  # noqa: F401
