"""Exact gradients (issue #14): every prefill method on every backend that can train.

The oracle is ``reference_attention`` over the pattern the method ran
(``stats.pattern.dense_mask``): its autograd gradients are the exact gradients of
attention over that allowed set, so a kernel's dq, dk, dv must equal them to rounding
(float64 inputs, tolerance 1e-10). Lengths are above ``DENSE_MAX_ELEMS`` (Nq * Nk >
1024 * 1024) so ``backend="auto"`` runs the sparse kernels, not the dense mask.

Also here: ``torch.autograd.gradcheck`` of each kernel forced on small inputs, through
both outputs (out and the log-sum-exp); fp32 / bf16 gradients against the float64
oracle; regressions of the old kernels (wrong gradients, backward raising); peak memory
of the backward at 16k.

Methods, configs, shapes and inputs: ``prefill_cases.py`` (shared with
test_partial_attention.py).
"""

from __future__ import annotations

import pytest
import torch
from method_checks import check_against_oracle, max_err, oracle
from prefill_cases import (
    CASES,
    CONFIGS,
    DENSE_MAX_ELEMS,
    SHAPES,
    D,
    config_for,
    make_inputs,
    prefill_methods,
)
from torch.autograd import gradcheck

import attnkit as ak
from attnkit.bench.speed import PeakMemory


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_every_prefill_method_is_covered():
    """The sweeps below are registry-driven: a new prefill method needs a config here."""
    from attnkit.kernels import DENSE_MAX_ELEMS as threshold

    assert DENSE_MAX_ELEMS == threshold
    assert set(CONFIGS) == set(prefill_methods())
    covered = {name for name, _, _ in CASES} | {"hyper"}  # hyper has no pattern: gradchecked
    assert covered == set(prefill_methods())
    for name, causal, _ in CASES:
        assert ("causal" if causal else "non_causal") in ak.method_info(name).supports, (name, causal)
    for info in ak.methods():
        if info.name in prefill_methods() and "causal" in info.supports and "non_causal" in info.supports and info.name != "hyper":
            assert {c for n, c, _ in CASES if n == info.name} == {True, False}, info.name


# --- every method, every backend that can train: forward and gradients = the oracle ---


@pytest.mark.parametrize(
    "name,causal,shape", CASES, ids=[f"{n}-{'causal' if c else 'noncausal'}-{s}" for n, c, s in CASES]
)
def test_gradients_equal_the_oracle_on_every_backend(name, causal, shape):
    b, hq, hkv, nq, nk = SHAPES[shape]
    assert nq * nk > DENSE_MAX_ELEMS
    q, k, v = make_inputs(b, hq, hkv, nq, nk, seed=len(name) + 7 * causal, requires_grad=True)
    grad_out = torch.randn(b, hq, nq, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    check_against_oracle(name, config_for(name, hq), causal, q, k, v, grad_out)


# --- gradcheck of each kernel, forced, through out and lse ------------------------------


def _gradcheck_method(name, config, causal, shape, backend, expect_backend=None):
    """gradcheck of (out, lse) = method(q, k, v) on ``backend`` (float64, small shapes)."""
    q, k, v = make_inputs(*shape[:5], d=shape[5], seed=3, requires_grad=True)
    method = ak.get(name, **config)
    _, _, stats = method(q, k, v, causal=causal, backend=backend, return_lse=True, return_stats=True)
    assert stats.backend == (expect_backend or backend)

    def f(q, k, v):
        return method(q, k, v, causal=causal, backend=backend, return_lse=True)

    assert gradcheck(f, (q, k, v), fast_mode=True)


def _block_backends(name, config, causal, shape):
    q, k, v = make_inputs(*shape[:5], d=shape[5], seed=3)
    return ak.get(name, **config).compatible_backends(q, k, v, causal, training=True, return_lse=True)


STREAMING_SMALL = {"sink": 2, "window": 8}
STREAMING_SHAPE = (1, 2, 1, 48, 48, 4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gradcheck_streaming_on_each_block_backend(causal):
    compatible = _block_backends("streaming", STREAMING_SMALL, causal, STREAMING_SHAPE)
    # blocks runs square blocks only (streaming's are 256 x 64): checked if it ever accepts them
    backends = [b for b in ("ranges", "gather", "dense", "blocks") if b in compatible]
    assert backends[:3] == ["ranges", "gather", "dense"]
    for backend in backends:
        _gradcheck_method("streaming", STREAMING_SMALL, causal, STREAMING_SHAPE, backend)


@pytest.mark.parametrize("backend", ["vertical_slash", "gather"])
def test_gradcheck_vertical_slash(backend):
    config = {"vertical_size": 8, "slash_size": 8, "last_q": 16, "sink": 2, "local": 4}
    shape = (1, 2, 1, 150, 150, 4)  # 3 query blocks of 64
    assert backend in _block_backends("vertical_slash", config, True, shape)
    _gradcheck_method("vertical_slash", config, True, shape, backend)


def test_gradcheck_moba_on_blocks():
    config = {"block_size": 64, "topk": 1, "sink": 0}
    shape = (1, 2, 1, 192, 192, 4)  # 3 square blocks of 64
    assert "blocks" in _block_backends("moba", config, True, shape)
    _gradcheck_method("moba", config, True, shape, "blocks")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gradcheck_hip_on_slots(causal):
    """hip's kept keys (``KeySlots``, anchors excluded) on the slots kernel, forced, and the
    whole method (kept keys + anchors merged by log-sum-exp) on gather."""
    from attnkit.kernels import run
    from attnkit.kernels.slots import KeySlots

    config = {"topk": 8, "block_size": 8, "chunk": 2, "sink": 2, "local": 8}
    q, k, v = make_inputs(1, 2, 1, 64, 64, d=4, seed=5, requires_grad=True)
    method = ak.get("hip", **config)
    slots = method.patterns(q, k, causal, 0.5)[0]
    assert isinstance(slots, KeySlots)

    def f(q, k, v):
        out, lse, used = run(slots, q, k, v, 0.5, backend="slots", return_lse=True)
        assert used == "slots"
        # rows whose keys are all anchors have none here (lse -inf): compare finite values
        return out, torch.where(torch.isinf(lse), 0.0, lse)

    assert gradcheck(f, (q, k, v), fast_mode=True)
    _gradcheck_method("hip", config, causal, (1, 2, 1, 64, 64, 4), "gather", expect_backend="gather+gather")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gradcheck_full_on_exact(causal):
    _gradcheck_method("full", {}, causal, (1, 2, 1, 40, 52, 4), "exact")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gradcheck_hyper(causal):
    config = {"min_seq_len": 8, "block_size": 4, "sample_size": 6, "sink": 2, "local": 4}
    _gradcheck_method("hyper", config, causal, (1, 2, 1, 40, 40, 4), "hyper")


@pytest.mark.parametrize("backend", ["gather", "ranges"])
def test_gradcheck_biformer(backend):
    config = {"grid": (8, 8), "regions": (2, 2), "topk": 2}
    assert backend in _block_backends("biformer", config, False, (1, 2, 2, 64, 64, 8))
    _gradcheck_method("biformer", config, False, (1, 2, 2, 64, 64, 8), backend)


# --- fp32 and bf16 gradients against the float64 oracle ----------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["streaming", "moba", "vertical_slash"])
def test_low_precision_gradients_are_close_to_theoracle(name, dtype, tol):
    b, hq, hkv, n = 1, 2, 1, 1100
    q, k, v = make_inputs(b, hq, hkv, n, n, dtype=dtype, seed=11, requires_grad=True)
    grad_out = torch.randn(b, hq, n, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, stats = ak.attention(q, k, v, method=name, causal=True, return_stats=True, **config_for(name, hq))
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    expected, expected_grads = oracle(q, k, v, stats.pattern.dense_mask(b, hq), True, grad_out)
    assert _rel_err(out, expected) < tol
    for which, got, want in zip("qkv", grads, expected_grads):
        assert got.dtype == dtype
        assert _rel_err(got, want) < tol, f"d{which}: relative error {_rel_err(got, want):.2e} ({stats.backend})"


# --- regressions of the old kernels (these use only the plain ak.attention API) ------------


def test_regression_streaming_causal_gradients_equal_theoracle():
    """The old range kernel's backward was wrong for causal streaming (dq, dk off by up to 3)."""
    n, sink, window = 1100, 4, 100
    q, k, v = make_inputs(1, 4, 2, n, n, seed=13, requires_grad=True)
    out = ak.attention(q, k, v, method="streaming", causal=True, sink=sink, window=window)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    mask = (j < sink) | (i - window < j)  # StreamingLLM, written independently of attnkit
    expected, expected_grads = oracle(q, k, v, mask, True, grad_out)
    assert max_err(out, expected) < 1e-10
    for which, got, want in zip("qkv", grads, expected_grads):
        assert max_err(got, want) < 1e-10, f"d{which} off by {max_err(got, want):.2e}"


REGRESSION_BACKWARD = [
    ("vertical_slash", "auto", 1100),
    ("flexprefill", "auto", 1300),
    ("moba", "auto", 1500),
    ("block_topk", "auto", 1100),
    ("routing", "auto", 1200),
    ("pbs", "auto", 1100),
    ("minference_block", "auto", 1400),
    ("streaming", "gather", 1100),
    ("moba", "gather", 1100),
]


@pytest.mark.parametrize("name,backend,n", REGRESSION_BACKWARD, ids=[f"{m}-{b}-N{n}" for m, b, n in REGRESSION_BACKWARD])
def test_regression_backward_runs(name, backend, n):
    """The old kernels raised in backward ("index_select(): functions with out=... do not
    support automatic differentiation", "modified by an inplace operation")."""
    q, k, v = make_inputs(1, 2, 1, n, n, dtype=torch.float32, seed=17, requires_grad=True)
    out = ak.attention(q, k, v, method=name, causal=True, backend=backend, **config_for(name, 2))
    out.backward(torch.ones_like(out))
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and bool(torch.isfinite(t.grad).all())
    assert float(v.grad.sum()) == pytest.approx(2 * n * D, rel=1e-4)  # each row's weights sum to 1


# --- peak memory of the backward -----------------------------------------------------------

MEMORY_N = 16384
MEMORY_LIMIT = 400 * 2**20  # one 16k x 16k float32 matrix per head is 1 GiB (2 heads: 2 GiB)


@pytest.mark.parametrize("name,config", [("streaming", {"sink": 64, "window": 1024}), ("moba", {})], ids=["streaming", "moba"])
def test_backward_peak_memory_is_subquadratic(name, config):
    q, k, v = make_inputs(1, 2, 2, MEMORY_N, MEMORY_N, d=64, dtype=torch.float32, seed=19)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    method = ak.get(name, **config)
    if hasattr(method, "pattern"):  # a static pattern is cached: O(N/64)^2 bools, not counted
        method.pattern(MEMORY_N, MEMORY_N, True, q.device)
    with PeakMemory() as mem:
        out = method(q, k, v, causal=True)
        out.backward(torch.ones_like(out))
    assert bool(torch.isfinite(q.grad).all())
    assert mem.grown < MEMORY_LIMIT, f"{name}: forward + backward grew {mem.grown / 2**20:.0f} MiB at N={MEMORY_N}"
