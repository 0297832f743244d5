"""Planted inputs shared by the estimator tests: q/k around a few known directions."""

from __future__ import annotations

import torch


def planted_clusters(n: int = 256, d: int = 32, seed: int = 7):
    """Queries and keys near 4 random directions (norm 5, noise 0.1), random labels.

    Returns q, k, v (1, 1, n, d) and the direction index of each query and key (n,).
    Seed 7 is one where spherical k-means with 4 centroids recovers the directions.
    """
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(4, d, generator=g), dim=1) * 5
    label_q = torch.randint(0, 4, (n,), generator=g)
    label_k = torch.randint(0, 4, (n,), generator=g)
    q = (dirs[label_q] + 0.1 * torch.randn(n, d, generator=g)).view(1, 1, n, d)
    k = (dirs[label_k] + 0.1 * torch.randn(n, d, generator=g)).view(1, 1, n, d)
    v = torch.randn(1, 1, n, d, generator=g)
    return q, k, v, label_q, label_k
