"""Every bad input gets an error that names the argument, what was given and what is allowed."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak


def qkv(b=1, hq=4, hkv=2, nq=16, nk=16, d=8, dtype=torch.float32):
    return torch.randn(b, hq, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype)


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dimensions \(B, H, N, D\), got 3"):
        ak.attention(q[0], k, v)


def test_batch_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="batch size B differs: q has 1, k has 2"):
        ak.attention(q, torch.cat([k, k]), v)


def test_head_dim_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="head dim D differs: q has 8, k has 4"):
        ak.attention(q, k[..., :4], v)


def test_length_mismatch_between_k_and_v():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="sequence length Nk differs: k has 16, v has 15"):
        ak.attention(q, k, v[:, :, :15])


def test_gqa_ratio():
    q, k, v = qkv(hq=4, hkv=3)
    with pytest.raises(ValueError, match="Hq=4 must be a multiple of KV heads Hkv=3"):
        ak.attention(q, k, v)


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="must share one dtype"):
        ak.attention(q, k.half(), v)


def test_integer_tensors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q has dtype torch.int64; allowed: float32, float16, bfloat16"):
        ak.attention(q.long(), k, v)


def test_mixed_devices():
    q, k, v = qkv()
    meta = torch.empty_like(k, device="meta")
    with pytest.raises(ValueError, match="must be on one device"):
        ak.attention(q, meta, v)


def test_empty_sequence():
    q, k, v = qkv(nq=0)
    with pytest.raises(ValueError, match="empty sequence: Nq=0"):
        ak.attention(q, k, v)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_checked_and_switchable(bad):
    q, k, v = qkv()
    k[0, 1, 3, 2] = bad
    with pytest.raises(ValueError, match=r"k contains 1 NaN/Inf value\(s\).*check_finite=False"):
        ak.attention(q, k, v, method="streaming", causal=True, sink=2, window=4)
    out = ak.attention(q, k, v, method="full", check_finite=False)  # switchable off
    assert out.shape == q.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_check_sees_one_bad_value_in_any_dtype(dtype, bad):
    from attnkit.validate import _all_finite

    t = torch.randn(3, 50, 7).to(dtype)
    assert _all_finite(t)
    t[2, 17, 3] = bad
    assert not _all_finite(t)


def test_finite_check_accepts_values_whose_sum_overflows():
    """The fast path sums; a sum that overflows from finite values is re-checked exactly."""
    from attnkit.validate import _all_finite

    big = torch.full((2, 8, 16), 3e38)
    assert not torch.isfinite(big.sum()) and _all_finite(big)
    q = torch.full((1, 2, 8, 4), 3e38)
    out = ak.attention(q, torch.zeros_like(q), torch.ones_like(q), method="full")
    assert out.shape == q.shape


def test_unknown_method_lists_close_matches():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown method 'streamin'. Did you mean 'streaming'.*Valid: .*sliding_window"):
        ak.attention(q, k, v, method="streamin")


def test_unknown_config_field_lists_fields_with_defaults():
    with pytest.raises(ValueError, match=r"unknown config field\(s\) 'windw' for method 'streaming'; valid fields with defaults: sink=4, window=1024"):
        ak.get("streaming", windw=3)


def test_ill_typed_config_field():
    with pytest.raises(TypeError, match=r"config field 'window' of method 'sliding_window' must be int, got '12' \(str\)"):
        ak.get("sliding_window", window="12")


@pytest.mark.parametrize("name,field", [("sliding_window", "window"), ("streaming", "sink"), ("streaming", "window"), ("dilated", "dilation")])
@pytest.mark.parametrize("value", [0, -3])
def test_window_sink_must_be_positive(name, field, value):
    with pytest.raises(ValueError, match=rf"{field} of method '{name}' must be an integer >= 1, got {value}"):
        ak.get(name, **{field: value})


def test_pattern_leaving_a_row_without_key_says_which():
    q, k, v = qkv(nq=8, nk=8)
    # dilated non-causal with window 1 (only itself) is fine; Nq < Nk non-causal window 1
    # with queries at positions 8.. leaves rows with no key in range for a band of width 1.
    q2, k2, v2 = qkv(nq=4, nk=8)
    for backend in ("dense", "gather", "ranges", "flex"):
        with pytest.raises(ValueError, match=r"leaves query row \d+ \(batch 0, head \d\) with no key"):
            ak.attention(q2, k2[:, :, :2], v2[:, :, :2], method="dilated", window=1, dilation=1, backend=backend)


def test_causal_with_more_queries_than_keys():
    q, k, v = qkv(nq=20, nk=16)
    with pytest.raises(ValueError, match="causal attention with Nq=20 > Nk=16"):
        ak.attention(q, k, v, causal=True)


def test_unknown_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'.*Valid: auto, dense, flex, vertical_slash, slots, ranges, blocks, gather"):
        ak.attention(q, k, v, method="streaming", backend="gpu")


def test_bad_scale():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        ak.attention(q, k, v, scale=-1.0)
    with pytest.raises(TypeError, match="scale must be a float or None"):
        ak.attention(q, k, v, scale="big")


def test_causal_must_be_bool():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="causal must be a bool"):
        ak.attention(q, k, v, causal="yes")


def test_not_a_tensor():
    _, k, v = qkv()
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        ak.attention([1, 2], k, v)
