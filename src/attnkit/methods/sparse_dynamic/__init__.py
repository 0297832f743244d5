"""Dynamic (content-aware) sparse prefill: an estimator picks blocks/columns/diagonals from q, k."""
