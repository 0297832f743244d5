"""Delta-rule family (delta, gated_delta, kda): every form against the float64 recurrence,
state passing, transformers' own fallbacks, gradients."""

from __future__ import annotations

import pytest
import torch

from attnkit.methods.linear import delta_rule as dr
from attnkit.reference import reference_delta_rule

B, HK, HV, DK, DV = 2, 2, 4, 16, 12
KINDS = ("delta", "gated_delta", "kda")


def make_inputs(kind: str, n: int, l2norm: bool, dtype=torch.float32, seed: int = 0, hk=HK, hv=HV, dk=DK, dv=DV):
    """q, k (B, Hk, N, Dk), v (B, Hv, N, Dv), g, beta, s0; keys of norm < 1 without l2norm (stable rule)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hk, n, dk, generator=gen)
    k = torch.randn(B, hk, n, dk, generator=gen)
    if l2norm:
        q, k = q * 3, k * 3  # the normalisation must matter
    else:
        k = torch.nn.functional.normalize(k, dim=-1) * 0.9
    v = torch.randn(B, hv, n, dv, generator=gen)
    beta = torch.rand(B, hv, n, generator=gen)
    # log-decays from mild to strong (exp(-10) per step): the chunked form must not overflow
    if kind == "gated_delta":
        g = -torch.exp(torch.randn(B, hv, n, generator=gen) - 1).clamp(max=10)
    elif kind == "kda":
        g = -torch.exp(torch.randn(B, hv, n, dk, generator=gen) - 1).clamp(max=10)
    else:
        g = None
    s0 = torch.randn(B, hv, dk, dv, generator=gen) * 0.5
    cast = (lambda x: None if x is None else x.to(dtype))
    return tuple(cast(x) for x in (q, k, v, g, beta, s0))


def run(kind: str, form: str, q, k, v, g, beta, s0, l2norm: bool, chunk_size: int = 64):
    """Call the attnkit function of (kind, form)."""
    kw = dict(initial_state=s0, use_qk_l2norm=l2norm)
    if form == "chunk":
        kw["chunk_size"] = chunk_size
    fn = getattr(dr, {"delta": "delta_rule", "gated_delta": "gated_delta_rule", "kda": "kda"}[kind] + "_" + form)
    return fn(q, k, v, beta, **kw) if kind == "delta" else fn(q, k, v, g, beta, **kw)


def assert_close_rel(x: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = (x.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"max abs error {err:.3e} vs scale {scale:.3e} (rel {rel})"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [37, 130])
@pytest.mark.parametrize("with_state", [False, True], ids=["s0=None", "s0"])
@pytest.mark.parametrize("l2norm", [False, True], ids=["raw", "l2norm"])
def test_forms_equal_float64_recurrence(kind, n, with_state, l2norm):
    """Chunked (C = 16 and 64) and recurrent forms against one oracle run."""
    q, k, v, g, beta, s0 = make_inputs(kind, n, l2norm)
    s0 = s0 if with_state else None
    ref_out, ref_state = reference_delta_rule(q, k, v, g, beta, s0, use_qk_l2norm=l2norm)
    for form, chunk_size in (("chunk", 16), ("chunk", 64), ("recurrent", 0)):
        out, state = run(kind, form, q, k, v, g, beta, s0, l2norm, chunk_size)
        assert out.shape == (B, HV, n, DV) and out.dtype == torch.float32, (form, chunk_size)
        assert state.shape == (B, HV, DK, DV) and state.dtype == torch.float32, (form, chunk_size)
        assert_close_rel(out, ref_out, 1e-5)
        assert_close_rel(state, ref_state, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_float64_inputs_are_exact(kind, form):
    q, k, v, g, beta, s0 = make_inputs(kind, 45, True, dtype=torch.float64)
    ref_out, ref_state = reference_delta_rule(q, k, v, g, beta, s0, use_qk_l2norm=True)
    out, state = run(kind, form, q, k, v, g, beta, s0, True, 16)
    assert out.dtype == state.dtype == torch.float64
    assert_close_rel(out, ref_out, 1e-11)
    assert_close_rel(state, ref_state, 1e-11)


def test_low_precision_inputs_keep_a_float32_state():
    q, k, v, g, beta, s0 = make_inputs("gated_delta", 20, True, dtype=torch.bfloat16)
    out, state = dr.gated_delta_rule_chunk(q, k, v, g, beta, use_qk_l2norm=True, chunk_size=16)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32


@pytest.mark.parametrize("kind", ["gated_delta", "kda"])
def test_extreme_decays_stay_finite_and_precise(kind):
    """Log-decays down to -200 per step, then none: a chunk-start factorisation would
    overflow, and float32 differences of the large cumulative sums would lose precision."""
    q, k, v, _, beta, s0 = make_inputs(kind, 64, True)
    shape = (B, HV, 64, DK) if kind == "kda" else (B, HV, 64)
    g = -torch.rand(*shape) * 200
    g[:, :, 5:13] *= 1e-4  # then weak decays: small differences of large sums
    ref_out, ref_state = reference_delta_rule(q, k, v, g, beta, s0, use_qk_l2norm=True)
    for form in ("chunk", "recurrent"):
        out, state = run(kind, form, q, k, v, g, beta, s0, True, 16)
        assert torch.isfinite(out).all()
        assert_close_rel(out, ref_out, 1e-5)
        assert_close_rel(state, ref_state, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_split_sequence_with_state_equals_one_shot(kind):
    """Chunked prefill of 50 tokens, chunked 60 more, then 20 decoded one at a time."""
    q, k, v, g, beta, s0 = make_inputs(kind, 130, True)
    full, full_state = run(kind, "chunk", q, k, v, g, beta, s0, True, 16)

    def part(lo, hi):
        return [None if x is None else x[:, :, lo:hi] for x in (q, k, v, g, beta)]

    outs, state = [], s0
    for lo, hi in ((0, 50), (50, 110)):
        out, state = run(kind, "chunk", *part(lo, hi), state, True, 16)
        outs.append(out)
    for t in range(110, 130):
        out, state = run(kind, "recurrent", *part(t, t + 1), state, True)
        outs.append(out)
    assert_close_rel(torch.cat(outs, dim=2), full, 1e-5)
    assert_close_rel(state, full_state, 1e-5)


# --- transformers' pure-PyTorch fallbacks (layout (B, N, H, D)) ---------------------


def to_tf(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.transpose(1, 2).contiguous()


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("with_state", [False, True], ids=["s0=None", "s0"])
@pytest.mark.parametrize("l2norm", [False, True], ids=["raw", "l2norm"])
def test_gated_delta_equals_transformers_qwen3_next(form, with_state, l2norm):
    qn = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    q, k, v, g, beta, s0 = make_inputs("gated_delta", 130, l2norm)
    s0 = s0 if with_state else None
    tf_args = [to_tf(x) for x in (q, k, v, g, beta)]
    if form == "chunk":
        tf_out, tf_state = qn.torch_chunk_gated_delta_rule(
            *tf_args, chunk_size=64, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=l2norm
        )
    else:
        tf_out, tf_state = qn.torch_recurrent_gated_delta_rule(
            *tf_args, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=l2norm
        )
    out, state = run("gated_delta", form, q, k, v, g, beta, s0, l2norm, 64)
    assert_close_rel(out, tf_out.transpose(1, 2), 1e-4)
    assert_close_rel(state, tf_state, 1e-4)


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("with_state", [False, True], ids=["s0=None", "s0"])
@pytest.mark.parametrize("l2norm", [False, True], ids=["raw", "l2norm"])
def test_kda_equals_transformers_kimi_linear(form, with_state, l2norm):
    kl = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    # transformers' Kimi fallback has no grouped heads: Hv = Hk
    q, k, v, g, beta, s0 = make_inputs("kda", 130, l2norm, hk=HV)
    s0 = s0 if with_state else None
    tf_args = [to_tf(x) for x in (q, k, v, g, beta)]
    if form == "chunk":
        tf_out, tf_state = kl.chunk_kimi_delta_attention(
            *tf_args, chunk_size=64, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=l2norm
        )
    else:
        tf_out, tf_state = kl.recurrent_kimi_delta_attention(
            *tf_args, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=l2norm
        )
    out, state = run("kda", form, q, k, v, g, beta, s0, l2norm, 64)
    assert_close_rel(out, tf_out.transpose(1, 2), 1e-4)
    assert_close_rel(state, tf_state, 1e-4)


# --- gradients and errors ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("l2norm", [False, True], ids=["raw", "l2norm"])
def test_gradcheck_float64(kind, form, l2norm):
    q, k, v, g, beta, s0 = make_inputs(kind, 11, l2norm, dtype=torch.float64, hk=1, hv=2, dk=3, dv=2)
    q, k, v, beta, s0 = (x[:1] for x in (q, k, v, beta, s0))
    g = None if g is None else g[:1]
    inputs = [x.clone().requires_grad_() for x in (q, k, v, beta, s0)]
    if g is not None:
        inputs.append(g.clone().requires_grad_())

    def fn(q, k, v, beta, s0, g=None):
        out, state = run(kind, form, q, k, v, g, beta, s0, l2norm, 4)
        return out, state

    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-5)


def test_bad_inputs_name_the_argument():
    q, k, v, g, beta, s0 = make_inputs("gated_delta", 10, True)
    with pytest.raises(ValueError, match="g must be"):
        dr.kda_chunk(q, k, v, g, beta)
    with pytest.raises(ValueError, match="beta must be"):
        dr.gated_delta_rule_chunk(q, k, v, g, beta[:, :1])
    with pytest.raises(ValueError, match="initial_state"):
        dr.gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=s0[..., :3])
    with pytest.raises(ValueError, match="multiple of Hk"):
        dr.delta_rule_chunk(q, k, v[:, :3], beta[:, :3])
    with pytest.raises(ValueError, match="power of two"):
        dr.kda_chunk(q, k, v, g.unsqueeze(-1).expand(*g.shape, DK), beta, chunk_size=24)


@pytest.mark.parametrize("kind", ["delta", "gated_delta"])
def test_per_head_decay_takes_any_chunk_size(kind):
    q, k, v, g, beta, s0 = make_inputs(kind, 50, True, dtype=torch.float64)
    ref_out, ref_state = reference_delta_rule(q, k, v, g, beta, s0, use_qk_l2norm=True)
    out, state = run(kind, "chunk", q, k, v, g, beta, s0, True, 24)
    assert_close_rel(out, ref_out, 1e-11)
    assert_close_rel(state, ref_state, 1e-11)
