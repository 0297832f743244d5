"""FlexPrefill against the float64 oracle, and its JS-divergence switch on constructed inputs."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit as ak
from attnkit.methods.base import full_pairs
from attnkit.methods.sparse_dynamic import flexprefill as fp  # registers the method
from attnkit.reference import causal_mask, reference_attention

SHAPES = [
    pytest.param((1, 2, 2, 77, 77, 16), id="N77"),
    pytest.param((2, 4, 2, 130, 130, 16), id="B2-gqa-N130"),
    pytest.param((2, 4, 2, 257, 257, 8), id="B2-gqa-N257"),
    pytest.param((1, 2, 1, 50, 257, 16), id="mqa-Nq50-Nk257"),
]

# tau=0 forces vertical-slash heads, tau=1 forces query-aware heads.
CONFIGS = [
    pytest.param({"block": 16, "min_budget": 16, "max_budget": 32, "tau": 0.0, "gamma": 0.5}, id="vertical-slash"),
    pytest.param({"block": 16, "min_budget": 16, "max_budget": 32, "tau": 1.0, "gamma": 0.5}, id="query-aware"),
    pytest.param({"block": 32, "min_budget": 32, "max_budget": 64}, id="auto-switch"),
]


def _inputs(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("backend", ["auto", "gather"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_on_own_pattern_fp32(shape, config, backend):
    b, hq, hkv, nq, nk, d = shape
    q, k, v = _inputs(b, hq, hkv, nq, nk, d)
    out, stats = ak.attention(q, k, v, method="flexprefill", causal=True, backend=backend, return_stats=True, **config)
    mask = stats.pattern.dense_mask(b, hq)
    expected = reference_attention(q, k, v, mask=mask, causal=True)
    assert out.shape == (b, hq, nq, d) and out.dtype == torch.float32
    assert (out.double() - expected).abs().max().item() < 1e-4
    allowed = (mask & causal_mask(nq, nk)).sum().item()
    assert stats.density == pytest.approx(allowed / (full_pairs(nq, nk, True) * b * hq))


def test_block_kernel_on_long_aligned_input_fp32():
    """Above the dense cut-off, query-aware heads run on the fused block kernel."""
    b, hq, hkv, n, d = 1, 2, 1, 1100, 8
    q, k, v = _inputs(b, hq, hkv, n, n, d, seed=2)
    out, stats = ak.attention(q, k, v, method="flexprefill", causal=True, return_stats=True, block=64, min_budget=64, max_budget=256, tau=1.0)
    assert "blocks" in stats.backend
    expected = reference_attention(q, k, v, mask=stats.pattern.dense_mask(b, hq), causal=True)
    assert (out.double() - expected).abs().max().item() < 1e-4
    assert stats.density < 0.6


@pytest.mark.parametrize("config", CONFIGS[:2])
def test_matches_reference_bf16(config):
    b, hq, hkv, nq, nk, d = 2, 4, 2, 131, 131, 32
    q, k, v = _inputs(b, hq, hkv, nq, nk, d, torch.bfloat16, seed=1)
    out, stats = ak.attention(q, k, v, method="flexprefill", causal=True, return_stats=True, **config)
    expected = reference_attention(q, k, v, mask=stats.pattern.dense_mask(b, hq), causal=True)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize("tau", [0.0, 1.0], ids=["vertical-slash", "query-aware"])
@pytest.mark.parametrize("shape", SHAPES)
def test_full_budget_is_exact_attention(shape, tau):
    b, hq, hkv, nq, nk, d = shape
    q, k, v = _inputs(b, hq, hkv, nq, nk, d)
    expected = reference_attention(q, k, v, causal=True)
    out, stats = ak.attention(q, k, v, method="flexprefill", causal=True, return_stats=True, block=16, gamma=1.0, tau=tau, min_budget=nk, max_budget=None)
    assert stats.density == pytest.approx(1.0)
    assert (out.double() - expected).abs().max().item() < 1e-4


def test_js_distance():
    p = torch.tensor([0.5, 0.5, 0.0])
    assert fp.js_distance(p, p).item() == pytest.approx(0.0, abs=1e-5)
    assert fp.js_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(math.sqrt(math.log(2)), abs=1e-4)


def _switch_inputs(n=512, d=16, block=64, seed=6):
    """Head 0: keys constant within each block, last queries identical -> the pooled
    estimate equals the true block distribution (query-aware). Head 1: one spiky key
    that mean pooling washes out -> estimate and truth disagree (vertical-slash)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, n, d, generator=g)
    k = torch.randn(1, 2, n, d, generator=g)
    u = torch.randn(d, generator=g)
    u = u / u.norm() * math.sqrt(d)
    q[0, :, -block:] = u
    block_keys = 0.5 * torch.randn(n // block, d, generator=g)
    k[0, 0] = block_keys.repeat_interleave(block, dim=0)
    k[0, 1] = 0.1 * k[0, 1]
    k[0, 1, 200] = 3 * u
    return q, k


def test_js_switch_picks_the_expected_mode():
    q, k = _switch_inputs()
    v = torch.randn_like(k)
    m = ak.get("flexprefill", block=64, min_budget=64, max_budget=None)
    out, stats = m(q, k, v, causal=True, return_stats=True)
    decision = m.last_decision
    assert decision.query_aware[0].tolist() == [True, False], decision.js
    assert decision.js[0, 0] < 0.1 < decision.js[0, 1]
    expected = reference_attention(q, k, v, mask=stats.pattern.dense_mask(1, 2), causal=True)
    assert (out.double() - expected).abs().max().item() < 1e-4


def test_planted_key_is_kept_by_a_vertical_slash_head():
    q, k = _switch_inputs()
    m = ak.get("flexprefill", block=64, min_budget=64, max_budget=128, tau=0.0)
    index = m.estimate(q, k, True, 16**-0.5)
    assert index.vs_heads == [0, 1]
    assert 200 in index.vs.verticals[0][1].tolist()


def test_config_validation_messages():
    with pytest.raises(ValueError, match="gamma"):
        ak.get("flexprefill", gamma=0.0)
    with pytest.raises(ValueError, match="tau"):
        ak.get("flexprefill", tau=2.0)
    with pytest.raises(ValueError, match="max_budget=512 .* must be >= min_budget=1024"):
        ak.get("flexprefill", max_budget=512)
    with pytest.raises(ValueError, match="block"):
        ak.get("flexprefill", block=0)
    with pytest.raises(ValueError, match="does not support causal=False"):
        q, k, v = _inputs(1, 2, 2, 10, 10, 8)
        ak.attention(q, k, v, method="flexprefill", causal=False)

