"""Sub-quadratic methods never build an Nq x Nk tensor: peak memory at a length where one would show."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.bench.speed import PeakMemory

N = 32768  # an N x N fp32 score matrix for one head is 4 GiB
LIMIT = 768 * 2**20

CONFIGS = [
    ("streaming", {"sink": 64, "window": 512}, "ranges"),
    ("streaming", {"sink": 64, "window": 512}, "gather"),
    ("sliding_window", {"window": 512}, "auto"),
    ("dilated", {"window": 128, "dilation": 2}, "auto"),
    ("power", {"block": 64, "window_blocks": 4}, "auto"),
    ("block_local_global", {}, "auto"),
    ("neighborhood", {"kernel_size": 9, "grid": (128, 256)}, "auto"),
    ("vertical_slash", {}, "auto"),
    ("flexprefill", {}, "auto"),
]


@pytest.fixture(scope="module")
def long_qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, N, 32, generator=g)
    k = torch.randn(1, 1, N, 32, generator=g)
    v = torch.randn(1, 1, N, 32, generator=g)
    return q, k, v


@pytest.mark.parametrize("name,config,backend", CONFIGS, ids=[f"{c[0]}-{c[2]}" for c in CONFIGS])
def test_peak_memory_is_subquadratic(long_qkv, name, config, backend):
    q, k, v = long_qkv
    method = ak.get(name, **config)
    causal = "causal" in method.info.supports and config.get("grid") is None
    if hasattr(method, "pattern"):  # a static pattern is cached: O(N/64)^2 bools, not counted
        method.pattern(N, N, causal, q.device)
    with PeakMemory() as mem:
        out = method(q, k, v, causal=causal, backend=backend)
    assert torch.isfinite(out).all()
    assert mem.grown < LIMIT, f"{name} grew {mem.grown / 2**20:.0f} MiB at N={N}"


def test_peak_memory_detects_quadratic():
    """The probe itself works: dense SDPA with an explicit N x N mask does show up."""
    n = 8192
    q = torch.randn(1, 1, n, 16)
    with PeakMemory() as mem:
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert mem.grown > 60 * 2**20
