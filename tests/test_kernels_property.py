"""Hypothesis: random shapes and random per-head block patterns through every kernel."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit.kernels import BlockPattern, causal_mod, compatible_backends, count_allowed_pairs, lists_from_block_mask, run
from attnkit.kernels.block_sparse import gather_plan
from attnkit.kernels.tiled import tiled_attention
from attnkit.reference import reference_attention


@st.composite
def problems(draw):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    nk = draw(st.integers(1, 150))
    nq = draw(st.integers(1, nk))
    d = draw(st.sampled_from([4, 8, 12]))
    bq = draw(st.sampled_from([8, 16, 64]))
    bk = draw(st.sampled_from([8, 16, 64]))
    causal = draw(st.booleans())
    per_head = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return b, hkv * group, hkv, nq, nk, d, bq, bk, causal, per_head, seed


def _random_pattern(b, hq, nq, nk, bq, bk, causal, per_head, gen):
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    shape = (b, hq, nqb, nkb) if per_head else (1, 1, nqb, nkb)
    blocks = torch.rand(shape, generator=gen) < 0.5
    # every query block keeps the block of its own last query (so no row is empty)
    last = torch.clamp(torch.arange(nqb) * bq + bq - 1, max=nq - 1) + (nk - nq)
    own = torch.minimum(last // bk, torch.tensor(nkb - 1))
    first = ((torch.arange(nqb) * bq) + (nk - nq)) // bk
    for qb in range(nqb):
        blocks[..., qb, first[qb] : own[qb] + 1] = True
    return BlockPattern(lists_from_block_mask(blocks), bq, bk, nq, nk, causal_mod if causal else None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_kernels_agree_with_reference_on_random_patterns(problem):
    b, hq, hkv, nq, nk, d, bq, bk, causal, per_head, seed = problem
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen)
    k = torch.randn(b, hkv, nk, d, generator=gen)
    v = torch.randn(b, hkv, nk, d, generator=gen)
    pattern = _random_pattern(b, hq, nq, nk, bq, bk, causal, per_head, gen)
    mask = pattern.dense_mask(b, hq)
    expected = reference_attention(q, k, v, mask=mask)
    backends = [name for name in compatible_backends(pattern, q, k, v) if name != "flex"]
    assert {"gather", "dense", "ranges"} <= set(backends)
    for backend in backends:
        out, lse, used = run(pattern, q, k, v, d**-0.5, backend=backend)
        assert used == backend
        assert (out.double() - expected).abs().max().item() < 1e-4, backend
    assert count_allowed_pairs(pattern, b, hq) == int(mask.sum())
    # tiny call budgets: one key slot per call, merged by log-sum-exp
    out, _ = tiled_attention(q, k, v, gather_plan(pattern, torch.float32, budget_elems=32), d**-0.5)
    assert (out.double() - expected).abs().max().item() < 1e-4


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 300),
    sink=st.integers(1, 40),
    window=st.integers(1, 120),
    causal=st.booleans(),
    hkv=st.sampled_from([1, 2]),
)
def test_streaming_backends_agree(n, sink, window, causal, hkv):
    q = torch.randn(1, 2 * hkv, n, 8)
    k = torch.randn(1, hkv, n, 8)
    v = torch.randn(1, hkv, n, 8)
    ref = ak.attention(q, k, v, method="streaming", causal=causal, sink=sink, window=window, backend="dense")
    for backend in ("ranges", "gather"):
        out = ak.attention(q, k, v, method="streaming", causal=causal, sink=sink, window=window, backend=backend)
        assert (out - ref).abs().max().item() < 1e-5
