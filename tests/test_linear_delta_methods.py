"""The delta-rule methods (delta, gated_delta, kda) through ak.attention: every form
against the float64 recurrence, state passing, value-head grouping, errors, gradients."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.methods.linear import KVState
from attnkit.reference import reference_delta_rule

B, HK, HV, DK, DV = 2, 2, 4, 8, 6
NAMES = ("delta", "gated_delta", "kda")


def make(name: str, n: int, dtype=torch.float32, seed: int = 0, hk: int = HK, hv: int = HV):
    """q, k (B, Hk, N, Dk), v (B, Hv, N, Dv), inputs dict (g, beta) of method ``name``."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, hk, n, DK, generator=gen, dtype=torch.float64) * 2 for _ in range(2))
    v = torch.randn(B, hv, n, DV, generator=gen, dtype=torch.float64)
    inputs = {"beta": torch.rand(B, hv, n, generator=gen, dtype=torch.float64)}
    if name == "gated_delta":
        inputs["g"] = -torch.rand(B, hv, n, generator=gen, dtype=torch.float64)
    elif name == "kda":
        inputs["g"] = -torch.rand(B, hv, n, DK, generator=gen, dtype=torch.float64)
    cast = lambda x: x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), {key: cast(x) for key, x in inputs.items()}


def oracle(q, k, v, inputs, s0=None, l2norm=True, scale=None):
    return reference_delta_rule(q, k, v, inputs.get("g"), inputs["beta"], s0, scale=scale, use_qk_l2norm=l2norm)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("form", ["chunk", "recurrent", "parallel"])
@pytest.mark.parametrize("l2norm", [True, False], ids=["l2norm", "raw"])
def test_every_form_equals_the_recurrence(name, form, l2norm):
    q, k, v, inputs = make(name, 45)
    if not l2norm:
        k = torch.nn.functional.normalize(k, dim=-1) * 0.9  # the raw rule is stable for |k| <= 1
    s0 = KVState(torch.randn(B, HV, DK, DV) * 0.5)
    out, state = ak.attention(q, k, v, method=name, causal=True, form=form, chunk_size=16, use_qk_l2norm=l2norm,
                              initial_state=s0, return_state=True, **inputs)
    ref_out, ref_state = oracle(q, k, v, inputs, s0.S, l2norm)
    assert out.shape == (B, HV, 45, DV) and out.dtype == torch.float32
    assert isinstance(state, KVState) and state.S.shape == (B, HV, DK, DV) and state.S.dtype == torch.float32
    assert (out.double() - ref_out).abs().max() < 1e-5 * max(1.0, ref_out.abs().max().item())
    assert (state.S.double() - ref_state).abs().max() < 1e-5 * max(1.0, ref_state.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
def test_default_config_is_transformers_call(name):
    """Defaults: use_qk_l2norm True, scale Dk^-0.5, form auto; a custom scale is used."""
    assert ak.method_info(name).config == {"form": "auto", "chunk_size": 64, "use_qk_l2norm": True}
    q, k, v, inputs = make(name, 20, dtype=torch.float64)
    out = ak.attention(q, k, v, method=name, causal=True, **inputs)
    assert (out - oracle(q, k, v, inputs)[0]).abs().max() < 1e-12
    out = ak.attention(q, k, v, method=name, causal=True, scale=0.7, **inputs)
    assert (out - oracle(q, k, v, inputs, scale=0.7)[0]).abs().max() < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_split_sequence_with_state_equals_one_shot(name):
    q, k, v, inputs = make(name, 70)
    whole = ak.attention(q, k, v, method=name, causal=True, **inputs)
    part = lambda x, a, b: x[:, :, a:b]  # noqa: E731
    out1, state = ak.attention(part(q, 0, 50), part(k, 0, 50), part(v, 0, 50), method=name, causal=True,
                               return_state=True, **{key: part(x, 0, 50) for key, x in inputs.items()})
    outs = [out1]
    for t in range(50, 70):  # token by token: the recurrent form (decode)
        o, state, stats = ak.attention(part(q, t, t + 1), part(k, t, t + 1), part(v, t, t + 1), method=name,
                                       causal=True, initial_state=state, return_state=True, return_stats=True,
                                       **{key: part(x, t, t + 1) for key, x in inputs.items()})
        assert stats.backend == "recurrent"
        outs.append(o)
    assert (torch.cat(outs, dim=2) - whole).abs().max() < 1e-5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtypes(name, dtype):
    q, k, v, inputs = make(name, 30, dtype=dtype)
    out, state = ak.attention(q, k, v, method=name, causal=True, return_state=True, **inputs)
    assert out.dtype == dtype and state.S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = oracle(q, k, v, inputs)[0]
    assert (out.double() - ref).abs().max() < (1e-11 if dtype == torch.float64 else 5e-2)


def test_value_heads_equal_repeated_qk():
    """Hv = 3 Hk: value head h reads q/k head h // 3, as transformers' repeat_interleave."""
    q, k, v, inputs = make("gated_delta", 25, hk=1, hv=3)
    grouped = ak.attention(q, k, v, method="gated_delta", causal=True, **inputs)
    rep = ak.attention(q.repeat_interleave(3, 1), k.repeat_interleave(3, 1), v, method="gated_delta", causal=True,
                       **inputs)
    assert torch.allclose(grouped, rep, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name):
    """Exact gradients in q, k, v, g and beta (a model trains its gates), chunked and recurrent."""
    q, k, v, inputs = make(name, 9, dtype=torch.float64)
    inputs["beta"] = inputs["beta"].clamp(0.05, 0.95)  # finite differences stay inside [0, 1]
    if "g" in inputs:
        inputs["g"] = inputs["g"].clamp(max=-0.05)
    keys = sorted(inputs)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, *(inputs[key] for key in keys))]
    for form in ("chunk", "recurrent"):
        def fn(q, k, v, *rest, form=form):
            return ak.attention(q, k, v, method=name, causal=True, form=form, chunk_size=4, **dict(zip(keys, rest)))

        assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_inputs(name):
    q, k, v, inputs = make(name, 33)
    want = ak.attention(q, k, v, method=name, causal=True, **inputs)
    nc = lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  same values, other strides
    got = ak.attention(nc(q), nc(k), nc(v), method=name, causal=True, **{key: x.transpose(0, 1).contiguous()
                                                                        .transpose(0, 1) for key, x in inputs.items()})
    assert not nc(q).is_contiguous() and torch.allclose(got, want, atol=1e-6)


def _q():
    return make("gated_delta", 10)


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v, i: ak.attention(q, k, v, method="gated_delta", **i),
     ValueError, r"method 'gated_delta' is causal only: the delta rule is a recurrence"),
    (lambda q, k, v, i: ak.attention(q, k, v, method="gated_delta", causal=True, beta=i["beta"]),
     ValueError, r"needs its decay: pass g"),
    (lambda q, k, v, i: ak.attention(q, k, v, method="gated_delta", causal=True, g=i["g"]),
     ValueError, r"needs beta, the delta rule's write strength"),
    (lambda q, k, v, i: ak.attention(q, k, v, method="gated_delta", causal=True, g=-i["g"] + 0.5, beta=i["beta"]),
     ValueError, r"g is a log-space decay and must be <= 0"),
    (lambda q, k, v, i: ak.attention(q, k, v, method="gated_delta", causal=True, g=i["g"], beta=i["beta"] * 3),
     ValueError, r"beta must lie in \[0, 1\]"),
    (lambda q, k, v, i: ak.attention(q, k, v, method="gated_delta", causal=True, g=i["g"][:, :2], beta=i["beta"]),
     ValueError, r"g must have shape \(2, 4, 10\)"),
    (lambda q, k, v, i: ak.attention(q, k, v, method="kda", causal=True, **i),
     ValueError, r"one decay per key channel: g must be \(2, 4, 10, 8\)"),
    (lambda q, k, v, i: ak.attention(q, k, v, method="delta", causal=True, **i),
     ValueError, r"unknown config field\(s\) 'g' for method 'delta'.*per-call inputs: beta, initial_state"),
    (lambda q, k, v, i: ak.attention(q, k, v[:, :3], method="gated_delta", causal=True, **i),
     ValueError, r"value heads Hv=3 must be a multiple of the q/k heads Hk=2"),
    (lambda q, k, v, i: ak.attention(q[:, :1], k, v, method="gated_delta", causal=True, **i),
     ValueError, r"q and k must have the same number of heads"),
    (lambda q, k, v, i: ak.attention(q, k, v, method="gated_delta", causal=True,
                                     initial_state=KVState(torch.zeros(2, 2, 8, 6)), **i),
     ValueError, r"initial_state.S must have shape \(2, 4, 8, 6\)"),
    (lambda q, k, v, i: ak.attention(q, k, v, method="gated_delta", causal=True, return_lse=True, **i),
     ValueError, r"has no softmax normaliser"),
    (lambda q, k, v, i: ak.get("kda", chunk_size=48),
     ValueError, r"chunk_size of method 'kda' must be a power of two"),
], ids=["noncausal", "no-g", "no-beta", "positive-g", "beta-range", "g-shape", "kda-per-head-g", "delta-g",
        "value-heads", "qk-heads", "state-shape", "lse", "kda-chunk"])
def test_bad_inputs_raise_clear_errors(call, error, match):
    q, k, v, inputs = _q()
    with pytest.raises(error, match=match):
        call(q, k, v, inputs)


def test_registered_with_info():
    info = {i.name: i for i in ak.methods(family="linear")}
    assert info["delta"].arxiv == "2406.06484" and info["gated_delta"].arxiv == "2412.06464"
    assert info["kda"].arxiv == "2510.26692"
    assert all("non_causal" not in info[n].supports for n in NAMES)
