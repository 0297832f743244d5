"""Partial attention (issue #14): the log-sum-exp, the empty-row convention, merging
partial results, and the one backend choice.

- ``return_lse=True``: every prefill method on every backend that can return it gives the
  float64 oracle's logsumexp over ``stats.pattern`` (float32 lse for fp32 / bf16 / fp16
  inputs, float64 for float64, shape (B, Hq, Nq)).
- A row with no allowed key: out 0, lse -inf (kernels, the oracle, ``merge_partials``);
  without ``return_lse`` ``ak.attention`` raises.
- lse is differentiable: two halves of the keys merged by log-sum-exp (ring attention)
  are exact attention over all keys, with exact gradients.
- ``backend=``: unknown and incompatible backends are errors listing the compatible ones;
  ``stats.backend`` names what ran; FlexAttention on the CPU is inference-only.
"""

from __future__ import annotations

import logging

import pytest
import torch
from prefill_cases import CASES, SHAPES, D, config_for, make_inputs, prefill_methods
from torch.autograd import gradcheck

import attnkit as ak
from attnkit.reference import reference_attention


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference on finite entries; inf entries must agree exactly."""
    a, b = a.double(), b.double()
    assert torch.equal(torch.isinf(a), torch.isinf(b)) and torch.equal(a[torch.isinf(a)], b[torch.isinf(b)])
    fin = torch.isfinite(b)
    return (a[fin] - b[fin]).abs().max().item() if bool(fin.any()) else 0.0


def _oracle_lse(q, k, v, mask, causal, scale=None):
    """(out, lse) of the float64 oracle (rows without keys: out 0, lse -inf)."""
    return reference_attention(q, k, v, mask=mask, causal=causal, scale=scale, return_lse=True)


# One shape per (method, causal): the last of test_gradients' cases for it.
LSE_CASES = list({(n, c): (n, c, s) for n, c, s in CASES}.values())


def test_lse_cases_cover_every_prefill_method():
    assert {n for n, _, _ in LSE_CASES} | {"hyper"} == set(prefill_methods())


# --- lse = the oracle's logsumexp, on every backend that can return it --------------------


@pytest.mark.parametrize(
    "name,causal,shape", LSE_CASES, ids=[f"{n}-{'causal' if c else 'noncausal'}-{s}" for n, c, s in LSE_CASES]
)
def test_lse_equals_the_oracle_on_every_backend(name, causal, shape):
    b, hq, hkv, nq, nk = SHAPES[shape]
    q, k, v = make_inputs(b, hq, hkv, nq, nk, seed=len(name) + 3 * causal)
    method = ak.get(name, **config_for(name, hq))
    backends = method.compatible_backends(q, k, v, causal, return_lse=True)
    assert backends and "flex" not in backends  # CPU FlexAttention has no lse
    expected = None
    for backend in ["auto"] + backends:
        out, lse, stats = method(q, k, v, causal=causal, backend=backend, return_lse=True, return_stats=True)
        if backend == "auto":
            assert "dense" not in stats.backend.split("+"), f"auto chose {stats.backend} at Nq*Nk = {nq * nk}"
        else:
            assert stats.backend in (backend, f"{backend}+{backend}"), (backend, stats.backend)
        assert lse.shape == (b, hq, nq) and lse.dtype == torch.float64
        mask = None if stats.pattern is None else stats.pattern.dense_mask(b, hq)
        if expected is None:
            expected = (mask, *_oracle_lse(q, k, v, mask, causal))
        elif mask is not None:
            assert torch.equal(mask, expected[0]), f"{backend}: another pattern than auto's"
        assert _err(lse, expected[2]) < 1e-10, f"{backend} ({stats.backend}): lse off by {_err(lse, expected[2]):.2e}"
        assert _err(out, expected[1]) < 1e-10, f"{backend} ({stats.backend}): out"
        if backend == "auto":  # without return_lse: the same output
            assert torch.equal(method(q, k, v, causal=causal), out)
    # fp32 inputs: float32 lse, close to the oracle on the fp32 values
    q32, k32, v32 = (t.float() for t in (q, k, v))
    out, lse, stats = method(q32, k32, v32, causal=causal, return_lse=True, return_stats=True)
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, nq) and out.dtype == torch.float32
    mask = None if stats.pattern is None else stats.pattern.dense_mask(b, hq)
    out64, lse64 = _oracle_lse(q32, k32, v32, mask, causal)
    assert _err(lse, lse64) < 1e-4 and _err(out, out64) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["full", "streaming", "moba", "hyper"])
def test_lse_dtype_and_shape(name, dtype):
    b, hq, hkv, nq, nk = SHAPES["Nq801-Nk1409"]
    q, k, v = make_inputs(b, hq, hkv, nq, nk, dtype=dtype, seed=4)
    out, lse = ak.attention(q, k, v, method=name, causal=True, return_lse=True, **config_for(name, hq))
    assert out.dtype == dtype and out.shape == (b, hq, nq, D)
    assert lse.shape == (b, hq, nq)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert bool(torch.isfinite(lse).all())


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_hyper_lse_shape_dtype_and_finite(causal):
    """hyper has no pattern (no oracle set to compare with): shape, dtype, finiteness, and
    the same output with and without lse."""
    b, hq, hkv, nq, nk = SHAPES["gqa-N1100"]
    q, k, v = make_inputs(b, hq, hkv, nq, nk, seed=6)
    out, lse, stats = ak.attention(q, k, v, method="hyper", causal=causal, return_lse=True, return_stats=True,
                                   **config_for("hyper", hq))
    assert stats.backend == "hyper" and stats.pattern is None
    assert lse.shape == (b, hq, nq) and lse.dtype == torch.float64 and bool(torch.isfinite(lse).all())
    assert torch.equal(ak.attention(q, k, v, method="hyper", causal=causal, **config_for("hyper", hq)), out)


# --- the empty-row convention ---------------------------------------------------------------


def _block_pattern_with_empty_rows(nq, nk, hq):
    """Per-head block lists (block 16) where some query blocks list nothing, and an element
    rule that empties more rows inside listed blocks (query positions divisible by 7)."""
    from attnkit.kernels import BlockPattern
    from attnkit.kernels.pattern import lists_from_block_mask

    g = torch.Generator().manual_seed(8)
    nqb, nkb = -(-nq // 16), -(-nk // 16)
    tiles = torch.rand(1, hq, nqb, nkb, generator=g) < 0.4
    tiles[:, 0, 1] = False  # head 0: query block 1 lists nothing
    tiles[:, :, 3] = False  # every head: query block 3 lists nothing
    tiles[:, :, 2, 0] = True
    return BlockPattern(kv_blocks=lists_from_block_mask(tiles), block_q=16, block_k=16, q_len=nq, kv_len=nk,
                        mask_mod=lambda b, h, qp, kp: (qp % 7) != 0)


def _key_slots_with_empty_rows(nq, nk, hkv):
    """KeySlots (block 16, 8 slots) where some query blocks keep no key, minus an
    excluded band (the anchors of a real method)."""
    from attnkit.kernels.slots import KeySlots

    g = torch.Generator().manual_seed(9)
    nqb = -(-nq // 16)
    tokens = torch.stack([torch.randperm(nk, generator=g)[:8] for _ in range(hkv * nqb)]).view(1, hkv, nqb, 8).sort(-1).values
    valid = torch.rand(1, hkv, nqb, 8, generator=g) < 0.7
    valid[:, :, 2] = False  # query block 2 keeps no key
    valid[:, 0, 4] = False  # KV head 0: query block 4 keeps no key
    valid[:, :, 1] = True
    tokens[:, :, 1] = torch.arange(8)  # query block 1 keeps keys 0..7, all excluded for rows at odd positions
    return KeySlots(tokens, valid, 16, nq, nk, exclude=lambda b, h, qp, kp: (kp < 8) & (qp % 2 == 1))


@pytest.mark.parametrize("kind", ["block-pattern", "key-slots"])
def test_empty_rows_give_zero_and_minus_inf_on_every_kernel(kind):
    from attnkit.kernels import as_block_pattern, compatible_backends, run
    from attnkit.kernels.backends import Needs

    b, hq, hkv, nq, nk = 1, 4, 2, 100, 120
    q, k, v = make_inputs(b, hq, hkv, nq, nk, seed=10, requires_grad=True)
    pattern = _block_pattern_with_empty_rows(nq, nk, hq) if kind == "block-pattern" else _key_slots_with_empty_rows(nq, nk, hkv)
    mask = as_block_pattern(pattern, hq).dense_mask(b, hq)
    empty = ~mask.any(-1)
    assert bool(empty.any()) and not bool(empty.all())
    expected_out, expected_lse = _oracle_lse(q, k, v, mask, False, scale=0.3)
    assert bool((expected_out[empty] == 0).all()) and bool(torch.isneginf(expected_lse[empty]).all())  # the oracle's convention
    g = torch.Generator().manual_seed(11)
    w_out = torch.randn(expected_out.shape, generator=g, dtype=torch.float64)
    w_lse = torch.randn(expected_lse.shape, generator=g, dtype=torch.float64)

    def loss(out, lse):
        return (out * w_out).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * w_lse).sum()

    expected_grads = torch.autograd.grad(loss(expected_out, expected_lse), (q, k, v))
    backends = compatible_backends(pattern, q, k, v, Needs(training=True, return_lse=True))
    # blocks and vertical_slash cannot hold an empty row (their diagonal tile is always computed)
    assert backends == (["dense", "ranges", "gather"] if kind == "block-pattern" else ["dense", "slots", "gather"])
    for backend in backends:
        out, lse, used = run(pattern, q, k, v, 0.3, backend=backend, return_lse=True)
        assert used == backend
        assert bool((out[empty] == 0).all()), backend
        assert bool(torch.isneginf(lse[empty]).all()) and bool(torch.isfinite(lse[~empty]).all()), backend
        assert _err(out, expected_out) < 1e-12 and _err(lse, expected_lse) < 1e-12, backend
        grads = torch.autograd.grad(loss(out, lse), (q, k, v))
        for which, got, want in zip("qkv", grads, expected_grads):
            assert bool(torch.isfinite(got).all()), f"{backend}: d{which} not finite"
            assert _err(got, want) < 1e-10, f"{backend}: d{which}"


@pytest.mark.parametrize("backend", ["dense", "ranges", "gather"])
def test_merge_of_disjoint_parts_is_attention_over_their_union(backend):
    """Part A holds the even key blocks, part B the odd ones; query block 1 has keys in B
    only, query block 3 in neither (out 0, lse -inf, finite gradients)."""
    from attnkit.kernels import BlockPattern, merge_partials, run
    from attnkit.kernels.pattern import lists_from_block_mask

    b, hq, hkv, nq, nk = 2, 2, 1, 80, 96
    q, k, v = make_inputs(b, hq, hkv, nq, nk, seed=12, requires_grad=True)
    nqb, nkb = nq // 16, nk // 16
    union = torch.rand(1, 1, nqb, nkb, generator=torch.Generator().manual_seed(13)) < 0.6
    union[..., 1, 1] = True
    union[..., 3, :] = False
    even = torch.arange(nkb) % 2 == 0
    part_a, part_b = union & even, union & ~even
    part_a[..., 1, :] = False  # query block 1: part A is empty, part B is not
    union = part_a | part_b

    def pattern(tiles):
        return BlockPattern(kv_blocks=lists_from_block_mask(tiles), block_q=16, block_k=16, q_len=nq, kv_len=nk)

    parts = [run(pattern(t), q, k, v, 0.25, backend=backend, return_lse=True)[:2] for t in (part_a, part_b)]
    assert bool(torch.isneginf(parts[0][1][:, :, 16:32]).all()) and bool((parts[0][0][:, :, 16:32] == 0).all())
    out, lse = merge_partials(parts)
    mask = pattern(union).dense_mask(b, hq)
    expected_out, expected_lse = _oracle_lse(q, k, v, mask, False, scale=0.25)
    rows = slice(48, 64)  # query block 3: no key in either part
    assert bool((out[:, :, rows] == 0).all()) and bool(torch.isneginf(lse[:, :, rows]).all())
    assert _err(out, expected_out) < 1e-12 and _err(lse, expected_lse) < 1e-12
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum() + torch.where(torch.isinf(lse), 0.0, lse).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected_out * w).sum() + torch.where(torch.isinf(expected_lse), 0.0, expected_lse).sum(), (q, k, v))
    for which, got, want in zip("qkv", grads, expected_grads):
        assert bool(torch.isfinite(got).all()), f"d{which} not finite"
        assert _err(got, want) < 1e-10, f"d{which}"


def test_merge_partials_conventions():
    from attnkit.kernels import merge_partials

    g = torch.Generator().manual_seed(15)
    out1 = torch.randn(1, 1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    out2 = torch.randn(1, 1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lse1 = torch.tensor([[[0.5, float("-inf"), 1.0, float("-inf")]]], dtype=torch.float64, requires_grad=True)
    lse2 = torch.tensor([[[0.2, 0.7, float("-inf"), float("-inf")]]], dtype=torch.float64, requires_grad=True)
    out, lse = merge_partials([(out1, lse1), (out2, lse2)])
    assert torch.allclose(lse[0, 0, 0], torch.logaddexp(lse1[0, 0, 0], lse2[0, 0, 0]))
    assert torch.equal(out[0, 0, 1], out2[0, 0, 1]) and torch.equal(out[0, 0, 2], out1[0, 0, 2])  # one part empty
    assert bool((out[0, 0, 3] == 0).all()) and bool(torch.isneginf(lse[0, 0, 3]))  # empty in both
    (out.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()
    for t in (out1, out2, lse1, lse2):
        assert bool(torch.isfinite(t.grad).all())
    assert bool((out1.grad[0, 0, 1] == 0).all()) and bool((out2.grad[0, 0, 3] == 0).all())
    with pytest.raises(ValueError, match="at least one"):
        merge_partials([])


def test_oracle_empty_row_convention():
    q, k, v = make_inputs(1, 1, 1, 6, 6, d=4, seed=16)
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[2] = False
    with pytest.raises(ValueError, match="no allowed key"):
        reference_attention(q, k, v, mask=mask)
    out, lse = reference_attention(q, k, v, mask=mask, return_lse=True)
    assert bool((out[0, 0, 2] == 0).all()) and bool(torch.isneginf(lse[0, 0, 2]))
    assert bool(torch.isfinite(lse[0, 0, [0, 1, 3, 4, 5]]).all())


def test_attention_with_empty_rows_raises_without_lse_and_is_zero_with_it():
    """dilated window=1 non-causal, Nq=64 > Nk=32: queries sit at positions -32..31, so
    the first 32 rows have no key (their own position is not a key)."""
    q, k, v = make_inputs(1, 2, 1, 64, 32, seed=17)
    config = {"window": 1, "dilation": 1}
    method = ak.get("dilated", **config)
    for backend in ["auto"] + method.compatible_backends(q, k, v, False):  # flex included: it checks the rows first
        with pytest.raises(ValueError, match=r"query row \d+ \(batch 0, head \d\) with no key"):
            ak.attention(q, k, v, method="dilated", backend=backend, **config)
    for backend in ["auto"] + method.compatible_backends(q, k, v, False, return_lse=True):
        out, lse, stats = ak.attention(q, k, v, method="dilated", backend=backend, return_lse=True, return_stats=True, **config)
        assert bool((out[:, :, :32] == 0).all()) and bool(torch.isneginf(lse[:, :, :32]).all()), backend
        expected_out, expected_lse = _oracle_lse(q, k, v, stats.pattern.dense_mask(1, 2), False)
        assert _err(out, expected_out) < 1e-12 and _err(lse, expected_lse) < 1e-12, backend


# --- lse gradients: merging partial results (ring attention) -------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_merging_two_halves_of_the_keys_is_exact_and_gradchecks(causal):
    """Each rank of ring attention holds some keys: attention over all of them is the
    log-sum-exp merge of the partial results, and its gradients flow through both lse's.
    Causal (queries = the last Nq positions): the keys before the queries unmasked, the
    last Nq keys causal."""
    from attnkit.kernels import merge_partials

    nq, nk = 12, 20
    n1 = nk - nq if causal else 9
    q, k, v = make_inputs(1, 2, 1, nq, nk, d=4, seed=18, requires_grad=True)

    def merged(q, k, v):
        first = ak.attention(q, k[:, :, :n1], v[:, :, :n1], method="full", causal=False, return_lse=True)
        second = ak.attention(q, k[:, :, n1:], v[:, :, n1:], method="full", causal=causal, return_lse=True)
        return merge_partials([first, second])

    out, lse = merged(q, k, v)
    expected_out, expected_lse = _oracle_lse(q, k, v, None, causal)
    assert _err(out, expected_out) < 1e-12 and _err(lse, expected_lse) < 1e-12
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum() + lse.sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected_out * w).sum() + expected_lse.sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        assert _err(got, want) < 1e-10
    assert gradcheck(merged, (q, k, v))  # through the merged out and lse


# --- the backend choice --------------------------------------------------------------------


def _long_inputs(requires_grad=False, n=1100):
    return make_inputs(1, 2, 1, n, n, dtype=torch.float32, seed=20, requires_grad=requires_grad)


@pytest.mark.parametrize("name", ["hip", "sea", "routing", "hyper", "vertical_slash", "streaming"])
def test_unknown_backend_is_an_error_listing_the_valid_ones(name):
    """(The old code silently ignored ``backend=`` for hip, sea, routing and hyper.)"""
    q, k, v = _long_inputs()
    config = config_for(name, 2)
    with pytest.raises(ValueError, match="bogus") as err:
        ak.attention(q, k, v, method=name, causal=True, backend="bogus", **config)
    for backend in ["auto"] + ak.get(name, **config).compatible_backends(q, k, v, True):
        assert backend in str(err.value), (backend, str(err.value))


INCOMPATIBLE = [
    ("streaming", "vertical_slash", "VerticalSlashIndex"),
    ("streaming", "slots", "KeySlots"),
    ("moba", "slots", "KeySlots"),
    ("vertical_slash", "ranges", "BlockPattern"),
    ("hip", "slots", "KeySlots"),  # hip's anchors are a BlockPattern: slots cannot run both parts
    ("hyper", "ranges", "own"),
]


@pytest.mark.parametrize("name,backend,reason", INCOMPATIBLE, ids=[f"{n}-{b}" for n, b, _ in INCOMPATIBLE])
def test_incompatible_backend_is_an_error_naming_the_reason(name, backend, reason):
    q, k, v = _long_inputs()
    config = config_for(name, 2)
    compatible = ak.get(name, **config).compatible_backends(q, k, v, True)
    assert backend not in compatible
    with pytest.raises(ValueError) as err:
        ak.attention(q, k, v, method=name, causal=True, backend=backend, **config)
    message = str(err.value)
    assert reason in message and repr(backend) in message, message
    for ok in ["auto"] + compatible:
        assert ok in message, (ok, message)


@pytest.mark.parametrize("name", ["hip", "sea"])
def test_key_slot_methods_run_on_the_slots_kernel_under_auto(name):
    """(The old code reported "gather".)"""
    q, k, v = _long_inputs()
    _, stats = ak.attention(q, k, v, method=name, causal=True, return_stats=True, **config_for(name, 2))
    assert stats.backend == "slots+ranges"


def test_flex_is_inference_only_on_the_cpu():
    from attnkit.kernels import choose_backend
    from attnkit.kernels.backends import Needs

    q, k, v = _long_inputs()
    for name in ("streaming", "moba", "vertical_slash"):
        method = ak.get(name, **config_for(name, 2))
        assert "flex" in method.compatible_backends(q, k, v, True)  # inference: it can run
        assert "flex" not in method.compatible_backends(q, k, v, True, training=True)
        assert "flex" not in method.compatible_backends(q, k, v, True, return_lse=True)
    pattern = ak.get("streaming", **config_for("streaming", 2)).patterns(q, k, True, 0.25)[0]
    with pytest.raises(ValueError, match="lse|log-sum-exp"):
        choose_backend(pattern, q, k, v, "flex", Needs(return_lse=True), "streaming")
    qg, kg, vg = _long_inputs(requires_grad=True)
    with pytest.raises(ValueError, match="inference-only"):
        ak.attention(qg, kg, vg, method="streaming", causal=True, backend="flex", **config_for("streaming", 2))
    with pytest.raises(ValueError, match="inference-only"):
        ak.attention(qg, kg, vg, method="moba", causal=True, backend="flex", **config_for("moba", 2))


def test_auto_logs_why_it_chose_its_backend(caplog):
    from attnkit.kernels import choose_backend

    q, k, v = _long_inputs()
    caplog.set_level(logging.DEBUG, logger="attnkit.kernels")
    _, stats = ak.attention(q, k, v, method="streaming", causal=True, return_stats=True, **config_for("streaming", 2))
    assert stats.backend == "ranges"
    messages = [r.getMessage() for r in caplog.records if r.name == "attnkit.kernels"]
    assert any("ranges" in m and "streaming" in m and "dense" in m and "Nq*Nk" in m for m in messages), messages
    caplog.clear()
    pattern = ak.get("moba", **config_for("moba", 2)).patterns(q, k, True, 0.25)[0]
    assert choose_backend(pattern, q, k, v, method="moba") == "blocks"
    messages = [r.getMessage() for r in caplog.records if r.name == "attnkit.kernels"]
    assert any("blocks" in m and "moba" in m and "vertical_slash" in m for m in messages), messages  # declined ones named
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "attnkit.kernels")
