"""MInference (vertical_slash, minference_block, minference + plan search) against the float64 oracle.

Exactness of the kernels is checked on each method's OWN returned pattern
(``stats.pattern.dense_mask()``); estimators are checked on planted inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnkit as ak
from attnkit.kernels.tiled import tiled_attention
from attnkit.kernels.vertical_slash import (
    VerticalSlashIndex,
    count_pairs,
    to_block_pattern,
    vertical_slash_plan,
)


def vertical_slash_attention(q, k, v, index, scale, budget_elems=1 << 25):
    """The vertical-slash kernel alone (its plan on the tiled executor)."""
    return tiled_attention(q, k, v, vertical_slash_plan(index, torch.float32, budget_elems), scale)[0]
from attnkit.methods.base import full_pairs
from attnkit.methods.sparse_dynamic import minference_plan
from attnkit.reference import causal_mask, reference_attention

# (B, Hq, Hkv, Nq, Nk, D): odd lengths, GQA, B=2, Nq < Nk (bottom-right aligned), Nq = 1.
SHAPES = [
    pytest.param((1, 2, 2, 77, 77, 16), id="N77"),
    pytest.param((2, 4, 2, 130, 130, 16), id="B2-gqa-N130"),
    pytest.param((2, 4, 2, 257, 257, 8), id="B2-gqa-N257"),
    pytest.param((1, 2, 1, 50, 257, 16), id="mqa-Nq50-Nk257"),
    pytest.param((1, 2, 2, 1, 70, 16), id="Nq1"),
]

HEAD_PATTERNS = [
    {"pattern": "a_shape", "sink": 4, "window": 10},
    {"pattern": "vertical_slash", "vertical_size": 5, "slash_size": 3},
    {"pattern": "block_sparse", "top_k": 1},
    {"pattern": "a_shape", "sink": 0, "window": 1},
]

# Small budgets, so the patterns are really sparse at these lengths.
METHODS = [
    pytest.param("vertical_slash", {"vertical_size": 10, "slash_size": 5, "sink": 2, "local": 3}, id="vs"),
    pytest.param("vertical_slash", {"vertical_size": 0, "slash_size": 1, "sink": 0, "local": 1}, id="vs-diag-only"),
    pytest.param("minference_block", {"top_k": 1}, id="block"),
    pytest.param("minference", {"head_patterns": HEAD_PATTERNS}, id="minference-mixed"),
]


def _inputs(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return q, k, v


def _config_for(name, config, hq):
    if name == "minference":
        return {"head_patterns": config["head_patterns"][:hq] * (hq // len(config["head_patterns"][:hq]))}
    return config


@pytest.mark.parametrize("backend", ["auto", "gather", "dense"])
@pytest.mark.parametrize("name,config", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_on_own_pattern_fp32(shape, name, config, backend):
    b, hq, hkv, nq, nk, d = shape
    q, k, v = _inputs(b, hq, hkv, nq, nk, d)
    config = _config_for(name, config, hq)
    out, stats = ak.attention(q, k, v, method=name, causal=True, backend=backend, return_stats=True, **config)
    mask = stats.pattern.dense_mask(b, hq)
    expected = reference_attention(q, k, v, mask=mask, causal=True)
    assert out.shape == (b, hq, nq, d) and out.dtype == torch.float32
    assert (out.double() - expected).abs().max().item() < 1e-4
    allowed = (mask & causal_mask(nq, nk)).sum().item()
    assert stats.density == pytest.approx(allowed / (full_pairs(nq, nk, True) * b * hq))
    assert stats.estimator_seconds > 0


@pytest.mark.parametrize("name,config", METHODS)
def test_matches_reference_bf16(name, config):
    b, hq, hkv, nq, nk, d = 2, 4, 2, 131, 131, 32
    q, k, v = _inputs(b, hq, hkv, nq, nk, d, torch.bfloat16, seed=1)
    out, stats = ak.attention(q, k, v, method=name, causal=True, return_stats=True, **_config_for(name, config, hq))
    expected = reference_attention(q, k, v, mask=stats.pattern.dense_mask(b, hq), causal=True)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize("shape", SHAPES)
def test_full_budget_is_exact_attention(shape):
    b, hq, hkv, nq, nk, d = shape
    q, k, v = _inputs(b, hq, hkv, nq, nk, d)
    expected = reference_attention(q, k, v, causal=True)
    out, stats = ak.attention(q, k, v, method="vertical_slash", causal=True, return_stats=True, vertical_size=nk, slash_size=nk)
    assert stats.density == pytest.approx(1.0)
    assert (out.double() - expected).abs().max().item() < 1e-4
    out = ak.attention(q, k, v, method="minference_block", causal=True, top_k=nk)
    assert (out.double() - expected).abs().max().item() < 1e-4


def test_kernel_counts_a_key_on_a_vertical_and_a_slash_once():
    """A key selected both as a column and by a diagonal run contributes once."""
    b, h, n, d = 1, 1, 200, 8
    q, k, v = _inputs(b, h, h, n, n, d)
    cols = torch.tensor([0, 5, 100, 150, 199])
    diags = torch.tensor([0, 1, 50, 51, 100, 130])  # covers columns 100 and 150 for some blocks
    index = VerticalSlashIndex([[cols]], [[diags]], 64, n, n)
    out = vertical_slash_attention(q, k, v, index, scale=d**-0.5)
    mask = to_block_pattern(index).dense_mask()
    expected = reference_attention(q, k, v, mask=mask, causal=True)
    assert (out.double() - expected).abs().max().item() < 1e-5
    assert count_pairs(index) == int((mask[0, 0] & causal_mask(n, n)).sum())


@pytest.mark.parametrize("budget_elems", [1, 600, 1 << 25])
def test_kernel_chunks_skip_runs_wholly_before_key_zero(budget_elems):
    """Far diagonals lie wholly before key 0 for the early chunks (skipped there) and
    partly for the chunk where they start (masked): the result is the same for one chunk
    or one block per chunk, and equals the oracle."""
    b, h, n, d = 2, 2, 451, 8
    q, k, v = _inputs(b, h, h, n, n, d, seed=3)
    cols = torch.tensor([0, 3, 200, 333])
    far = [torch.tensor([0, 1, 2, 150, 300, 301, 440]), torch.tensor([0, 64, 129, 390])]
    index = VerticalSlashIndex([[cols, cols[:2]]] * b, [far] * b, 64, n, n)
    out = vertical_slash_attention(q, k, v, index, scale=d**-0.5, budget_elems=budget_elems)
    expected = reference_attention(q, k, v, mask=to_block_pattern(index).dense_mask(), causal=True)
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_planted_vertical_is_selected():
    b, h, n, d = 2, 2, 300, 16
    q, k, _v = _inputs(b, h, h, n, n, d, seed=3)
    u = torch.randn(d)
    q[:, :, -64:] = u + 0.1 * q[:, :, -64:]
    k[:, :, 177] = 8 * u / u.norm() * math.sqrt(d)
    m = ak.get("vertical_slash", vertical_size=1, slash_size=1, sink=0, local=1)
    index = m.estimate(q, k, True, d**-0.5)
    for bb in range(b):
        for hh in range(h):
            assert index.verticals[bb][hh].tolist() == [177]


def test_planted_diagonal_is_found():
    b, h, n, d, shift = 1, 2, 300, 16, 37
    q, k, v = _inputs(b, h, h, n, n, d, seed=4)
    k[:, :, : n - shift] = 3 * q[:, :, shift:]  # key i - shift matches query i: diagonal 37
    m = ak.get("vertical_slash", vertical_size=0, slash_size=2, sink=0, local=1)
    index = m.estimate(q, k, True, d**-0.5)
    for hh in range(h):
        assert index.slashes[0][hh].tolist() == [0, shift]
    out, stats = m(q, k, v, causal=True, return_stats=True)
    expected = reference_attention(q, k, v, mask=stats.pattern.dense_mask(b, h), causal=True)
    assert (out.double() - expected).abs().max().item() < 1e-4


def _sink_local_head(n, d, amp=8.0):
    """q, k of one head whose attention is the first key plus a short local window:
    RoPE-like rotations at six halving frequencies (no recurrence within n = 512) peak
    at distance 0, and one shared dimension makes key 0 a sink."""
    pos = torch.arange(n, dtype=torch.float32)
    q = torch.zeros(n, d)
    k = torch.zeros(n, d)
    for f in range(6):
        angle = 0.3 * 0.5**f * pos
        q[:, 2 * f], q[:, 2 * f + 1] = amp * torch.cos(angle), amp * torch.sin(angle)
        k[:, 2 * f], k[:, 2 * f + 1] = torch.cos(angle), torch.sin(angle)
    q[:, 12] = 6 * amp
    k[0, :12] = 0.0
    k[0, 12] = 1.0  # the sink
    return q, k


def test_search_assigns_a_shape_to_a_sink_local_head(tmp_path):
    n, d = 512, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, n, d, generator=g)
    k = torch.randn(1, 2, n, d, generator=g)
    q[0, 0], k[0, 0] = _sink_local_head(n, d)
    u = torch.randn(d, generator=g)
    q[0, 1] = 2 * u + 0.3 * q[0, 1]
    k[0, 1, 300] = 6 * u  # a mid-sequence column no A-shape covers
    plan = minference_plan.search_head_patterns(q, k, budget=0.3)
    assert plan[0]["pattern"] == "a_shape", plan
    assert plan[1]["pattern"] != "a_shape", plan
    assert all(0 < e["density"] <= 0.3 for e in plan)

    path = str(tmp_path / "plan.json")
    minference_plan.save_plan(path, [plan, plan])
    layers = minference_plan.load_plan(path)
    assert len(layers) == 2 and [e["pattern"] for e in layers[1]] == [e["pattern"] for e in plan]
    v = torch.randn(1, 2, n, d, generator=g)
    by_plan = ak.attention(q, k, v, method="minference", causal=True, plan=path, layer=1)
    by_list = ak.attention(q, k, v, method="minference", causal=True, head_patterns=plan)
    assert torch.equal(by_plan, by_list)


def test_config_validation_messages(tmp_path):
    with pytest.raises(ValueError, match="slash_size"):
        ak.get("vertical_slash", slash_size=0)
    with pytest.raises(ValueError, match="vertical_size"):
        ak.get("vertical_slash", vertical_size=-1)
    with pytest.raises(ValueError, match="unknown config field"):
        ak.get("vertical_slash", verticals=3)
    with pytest.raises(ValueError, match="does not support causal=False"):
        q, k, v = _inputs(1, 2, 2, 10, 10, 8)
        ak.attention(q, k, v, method="vertical_slash", causal=False)
    with pytest.raises(ValueError, match="exactly one of plan"):
        ak.get("minference")
    with pytest.raises(ValueError, match="unknown pattern 'a-shape'"):
        ak.get("minference", head_patterns=[{"pattern": "a-shape", "sink": 4, "window": 8}])
    with pytest.raises(ValueError, match="missing \\['window'\\]"):
        ak.get("minference", head_patterns=[{"pattern": "a_shape", "sink": 4}])
    with pytest.raises(ValueError, match="does not exist"):
        ak.get("minference", plan=str(tmp_path / "nope.json"))
    path = str(tmp_path / "p.json")
    minference_plan.save_plan(path, [[{"pattern": "a_shape", "sink": 4, "window": 8}]])
    with pytest.raises(ValueError, match="layer=3 .* out of range"):
        ak.get("minference", plan=path, layer=3)
    with pytest.raises(ValueError, match="one per query head"):
        q, k, v = _inputs(1, 2, 2, 10, 10, 8)
        ak.attention(q, k, v, method="minference", causal=True, plan=path)
    with pytest.raises(ValueError, match="budget"):
        minference_plan.search_head_patterns(q, k, budget=0.0)

