"""Every registered static pattern against the float64 oracle with the mask built from tests/rules.py."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.reference import reference_attention
from rules import RULES

STATIC = [m.name for m in ak.methods(family="static_sparse")]

# (B, Hq, Hkv, Nq, Nk, D): odd lengths not multiple of the 64-token block, N=1, GQA, B=2.
SHAPES = [
    pytest.param((1, 2, 2, 1, 1, 16), id="N1"),
    pytest.param((2, 4, 2, 77, 77, 16), id="B2-gqa-N77"),
    pytest.param((1, 4, 1, 130, 130, 8), id="mqa-N130"),
    pytest.param((2, 2, 2, 33, 150, 16), id="Nq33-Nk150"),
]


def _is_grid(config):
    return config.get("grid") is not None


def cases(with_grid=False, causal=None):
    """(name, config, rule) of every registered static method; grid patterns (which fix N)
    have their own tests in test_neighborhood_power_bigbird.py."""
    for name in STATIC:
        if causal is not None and not _supported(name, causal):
            continue
        for n, (config, rule) in enumerate(RULES.get(name, [])):
            if with_grid or not _is_grid(config):
                yield pytest.param(name, config, rule, id=f"{name}-{n}")


def fp32_cases():
    for causal in (True, False):
        for case in cases(causal=causal):
            for shape in SHAPES:
                if causal and shape.values[0][3] > shape.values[0][4]:
                    continue
                name, config, rule = case.values
                yield pytest.param(name, config, rule, shape.values[0], causal, id=f"{case.id}-{shape.id}-{'causal' if causal else 'noncausal'}")


def test_every_static_method_has_a_rule():
    missing = [name for name in STATIC if name not in RULES]
    assert not missing, f"add an independent rule to tests/rules.py for: {missing}"


def _inputs(b, hq, hkv, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return q, k, v


def _supported(name, causal):
    return ("causal" if causal else "non_causal") in ak.method_info(name).supports


def _geometry_refused(name, config, nq, nk, causal) -> bool:
    """Some patterns constrain N (a neighborhood kernel longer than the sequence, queries
    before position 0): they must refuse with a ValueError that says why."""
    try:
        ak.get(name, **config).pattern(nq, nk, causal, torch.device("cpu"))
    except ValueError as err:
        assert any(word in str(err) for word in ("too short", "Nq", "kernel")), str(err)
        return True
    return False


@pytest.mark.parametrize("backend", ["ranges", "gather", "dense"])
@pytest.mark.parametrize("name,config,rule,shape,causal", list(fp32_cases()))
def test_matches_reference_fp32(name, config, rule, shape, causal, backend):
    b, hq, hkv, nq, nk, d = shape
    if _geometry_refused(name, config, nq, nk, causal):
        return
    q, k, v = _inputs(b, hq, hkv, nq, nk, d, torch.float32)
    mask = rule(config, nq, nk, causal)
    if not bool(mask.any(-1).all()):
        with pytest.raises(ValueError, match="no key"):
            ak.attention(q, k, v, method=name, causal=causal, backend=backend, **config)
        return
    expected = reference_attention(q, k, v, mask=mask, causal=causal)
    out = ak.attention(q, k, v, method=name, causal=causal, backend=backend, **config)
    assert out.shape == (b, hq, nq, d) and out.dtype == torch.float32
    assert (out.double() - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,config,rule", list(cases()))
def test_matches_reference_half(name, config, rule, dtype):
    causal = _supported(name, True)
    b, hq, hkv, nq, nk, d = 2, 4, 2, 100, 100, 32
    q, k, v = _inputs(b, hq, hkv, nq, nk, d, dtype, seed=1)
    mask = rule(config, nq, nk, causal)
    assert bool(mask.any(-1).all()), "choose configs that cover every row at N=100"
    expected = reference_attention(q, k, v, mask=mask, causal=causal)
    out = ak.attention(q, k, v, method=name, causal=causal, backend="gather", **config)
    assert out.dtype == dtype
    rel = (out.double() - expected).norm() / expected.norm()
    assert rel.item() < 2e-2


@pytest.mark.parametrize("name,config,rule", list(cases()))
def test_density_stat_counts_allowed_pairs(name, config, rule):
    causal = _supported(name, True)
    nq = nk = 150
    q, k, v = _inputs(1, 2, 1, nq, nk, 8, torch.float32)
    mask = rule(config, nq, nk, causal)
    assert bool(mask.any(-1).all()), "choose configs that cover every row at N=150"
    allowed = (mask & torch.ones(nq, nk, dtype=torch.bool).tril()) if causal else mask
    total = nq * (nq + 1) // 2 if causal else nq * nk
    for backend in ("ranges", "gather", "dense"):
        _, stats = ak.attention(q, k, v, method=name, causal=causal, backend=backend, return_stats=True, **config)
        assert stats.density == pytest.approx(allowed.sum().item() / total)
        assert stats.estimator_seconds == 0.0
        assert stats.pattern is not None or name == "full"


def test_nan_in_unwritten_output_is_impossible():
    """The gather kernel writes every output row (fla's NaN-fill trick, via tiny budgets)."""
    from attnkit.kernels.block_sparse import gather_plan
    from attnkit.kernels.tiled import tiled_attention

    q, k, v = _inputs(2, 4, 2, 131, 131, 8, torch.float32)
    m = ak.get("streaming", sink=3, window=20)
    pattern = m.pattern(131, 131, True, q.device)
    out, _ = tiled_attention(q, k, v, gather_plan(pattern, torch.float32, budget_elems=64), 8**-0.5)
    expected = reference_attention(q, k, v, mask=RULES["streaming"][0][1]({"sink": 3, "window": 20}, 131, 131, True), causal=True)
    assert torch.isfinite(out).all()
    assert (out.double() - expected).abs().max().item() < 1e-4


def test_backends_agree_including_flex():
    q, k, v = _inputs(1, 4, 2, 200, 200, 16, torch.float32)
    outs = {be: ak.attention(q, k, v, method="streaming", causal=True, sink=4, window=50, backend=be) for be in ("ranges", "gather", "dense", "flex")}
    assert (outs["gather"] - outs["dense"]).abs().max() < 1e-5
    assert (outs["flex"] - outs["dense"]).abs().max() < 1e-4
    assert (outs["ranges"] - outs["dense"]).abs().max() < 1e-5
