"""HyperAttention is approximate by design: test the properties its estimator promises."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.methods.sparse_dynamic import hyper  # noqa: F401  (register)
from attnkit.methods.sparse_dynamic.hyper import _Run
from attnkit.reference import reference_attention


def _inputs(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g) * 0.5
    k = torch.randn(b, hkv, nk, d, generator=g) * 0.5
    v = torch.randn(b, hkv, nk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


EXACT = [
    pytest.param({"block_size": 32, "sample_size": 10_000, "min_seq_len": 64}, id="sample-every-key"),
    pytest.param({"block_size": 10_000, "sample_size": 0, "min_seq_len": 64}, id="one-lsh-chunk"),
    pytest.param({"min_seq_len": 10_000}, id="causal-base-case"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 257, 257), (1, 2, 1, 77, 130)], ids=["B2-gqa-N257", "Nq77-Nk130"])
@pytest.mark.parametrize("config", EXACT)
def test_exact_when_the_budget_covers_everything(config, shape, causal):
    b, hq, hkv, nq, nk = shape
    if not causal and "min_seq_len" in config and len(config) == 1:
        config = {"block_size": 10_000}
    q, k, v = _inputs(b, hq, hkv, nq, nk, 16)
    out, stats = ak.attention(q, k, v, method="hyper", causal=causal, return_stats=True, **config)
    expected = reference_attention(q, k, v, causal=causal)
    assert (out.double() - expected).abs().max().item() < 1e-4
    assert stats.density == pytest.approx(1.0)
    assert stats.pattern is None


def test_bf16_runs_and_matches_when_exact():
    q, k, v = _inputs(2, 4, 2, 130, 130, 32, torch.bfloat16)
    out = ak.attention(q, k, v, method="hyper", causal=True, block_size=32, sample_size=10_000, min_seq_len=32)
    expected = reference_attention(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-2


def test_value_head_size_may_differ_from_the_query_head_size():
    q, k, _ = _inputs(2, 4, 2, 130, 130, 16)
    v = torch.randn(2, 2, 130, 24, generator=torch.Generator().manual_seed(5))
    out = ak.attention(q, k, v, method="hyper", causal=True, min_seq_len=10_000)
    assert out.shape == (2, 4, 130, 24)
    assert (out.double() - reference_attention(q, k, v, causal=True)).abs().max().item() < 1e-4


def _rel_error(causal, sample_size, seed):
    q, k, v = _inputs(1, 2, 2, 512, 512, 16, seed=1)
    out = ak.attention(q, k, v, method="hyper", causal=causal, block_size=64, sample_size=sample_size, min_seq_len=128, seed=seed,
                       sink=0, local=0)
    expected = reference_attention(q, k, v, causal=causal)
    return ((out.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_error_decreases_with_more_samples(causal):
    errors = [sum(_rel_error(causal, m, seed) for seed in range(4)) / 4 for m in (16, 64, 256)]
    assert errors[0] > errors[1] > errors[2], errors


def test_sampled_normaliser_is_unbiased():
    """E[exp(lse)] over the sampling = the exact softmax normaliser (LSH chunks fixed by the
    hash seed, keys sampled without replacement and weighted by Nk / m; no ApproxD cap)."""
    q, k, v = _inputs(1, 1, 1, 64, 256, 16, seed=2)
    scale = 0.25
    exact = torch.logsumexp((q @ k.transpose(-1, -2)).double() * scale, dim=-1).exp()
    total = torch.zeros_like(exact)
    draws = 300
    for seed in range(draws):
        run = _Run(ak.get("hyper", block_size=32, sample_size=16, seed=seed, sample_cap=None).config, scale, q.device)
        torch.manual_seed(0)
        _, lse = run.non_causal(q.double(), k.double(), v.double())
        total += lse.exp()
    ratio = (total / draws) / exact
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.05)


def _heavy_tailed_inputs(seed):
    """512 tokens; 6 keys far from every query's band score ~6 above the rest for every query."""
    q, k, v = _inputs(1, 1, 1, 512, 512, 16, seed=seed)
    direction = torch.randn(16, generator=torch.Generator().manual_seed(99))
    direction /= direction.norm()
    q[0, 0] += 2.0 * direction
    k[0, 0, [40, 90, 150, 200, 260, 330]] += 12.0 * direction
    return q, k, v


def test_sample_cap_only_lowers_the_normaliser():
    """ApproxD's cap min(exp(s_ij), C_i) applies to sampled entries only: for the same draw, every
    row's normaliser is at most the uncapped one, and the exactly computed parts are untouched."""
    q, k, v = _heavy_tailed_inputs(0)
    for seed in range(5):
        lse = {}
        for cap in (None, 0.05):
            run = _Run(ak.get("hyper", block_size=32, sample_size=16, seed=seed, sample_cap=cap).config, 0.25, q.device)
            lse[cap] = run.non_causal(q.double(), k.double(), v.double())[1]
        assert (lse[0.05] <= lse[None] + 1e-9).all()
        assert (lse[0.05] < lse[None] - 1e-6).any()


def test_sample_cap_narrows_the_spread_of_the_normaliser():
    """A few heavy keys outside the exact parts: uncapped, a draw that catches one weights it
    Nk / m times; ApproxD's cap bounds that (a biased estimate with a much smaller spread)."""
    q, k, v = _heavy_tailed_inputs(0)

    def spread(cap):
        draws = []
        for seed in range(40):
            run = _Run(ak.get("hyper", block_size=32, sample_size=16, seed=seed, sample_cap=cap).config, 0.25, q.device)
            draws.append(run.non_causal(q.double(), k.double(), v.double())[1])
        return torch.stack(draws).std(dim=0).mean().item()

    assert spread(0.05) < spread(None) / 2


@pytest.mark.parametrize("offset", [1, 17, 31])
@pytest.mark.parametrize("n", [256, 300])
def test_every_query_sees_its_previous_local_keys_exactly(offset, n):
    """A head that attends to the token ``offset`` back (offset < local): each query's own
    diagonal block, or the band before the split next to it, holds that key, so the output is
    that key's value for every query, wherever the recursion splits (n = 300: uneven halves)."""
    q = torch.zeros(1, 1, n, n)
    k = torch.eye(n).view(1, 1, n, n)
    v = torch.randn(1, 1, n, 8, generator=torch.Generator().manual_seed(3))
    rows = torch.arange(offset, n)
    q[0, 0, rows, rows - offset] = 40.0
    out = ak.attention(q, k, v, method="hyper", causal=True, scale=1.0, block_size=16, sample_size=8, min_seq_len=32,
                       sink=0, local=32)
    assert (out[0, 0, offset:] - v[0, 0, : n - offset]).abs().max().item() < 1e-4


def test_peak_memory_at_16k_is_far_below_n_squared():
    from attnkit.bench.speed import PeakMemory

    n = 16384
    q, k, v = _inputs(1, 2, 1, n, n, 32)
    with PeakMemory() as mem:
        out = ak.attention(q, k, v, method="hyper", causal=True)
    assert torch.isfinite(out).all()
    assert mem.grown < n * n * 4 / 4


def test_config_errors():
    with pytest.raises(ValueError, match="sample_size"):
        ak.get("hyper", sample_size=-1)
    with pytest.raises(ValueError, match="lsh_bits"):
        ak.get("hyper", lsh_bits=40)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="sample_cap .* finite number > 0 or None"):
            ak.get("hyper", sample_cap=bad)
