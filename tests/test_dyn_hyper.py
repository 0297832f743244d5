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
    hash seed, keys sampled without replacement and weighted by Nk / m)."""
    q, k, v = _inputs(1, 1, 1, 64, 256, 16, seed=2)
    scale = 0.25
    exact = torch.logsumexp((q @ k.transpose(-1, -2)).double() * scale, dim=-1).exp()
    total = torch.zeros_like(exact)
    draws = 300
    for seed in range(draws):
        run = _Run(ak.get("hyper", block_size=32, sample_size=16, seed=seed).config, scale, q.device)
        torch.manual_seed(0)
        _, lse = run.non_causal(q.double(), k.double(), v.double())
        total += lse.exp()
    ratio = (total / draws) / exact
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.05)


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
