"""Fidelity metrics against the float64 reference, on random tensors (no model needed)."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.bench.tasks.fidelity import allowed_rows, compare, exact_output

CASES = [("streaming", {"sink": 3, "window": 17}), ("sliding_window", {"window": 40}),
         ("dilated", {"window": 8, "dilation": 3}), ("block_local_global", {"block": 16, "window_blocks": 3, "global_tokens": 4, "random_blocks": 1})]


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=[c[0] for c in CASES])
def test_allowed_rows_match_dense_mask(name, cfg):
    q, k, v = torch.randn(1, 6, 130, 16), torch.randn(1, 2, 130, 16), torch.randn(1, 2, 130, 16)
    _, stats = attnkit.attention(q, k, v, method=name, causal=True, return_stats=True, **cfg)
    dense = stats.pattern.dense_mask(1, 6)[0]
    for r0, r1 in [(0, 130), (0, 7), (33, 100), (129, 130)]:
        assert torch.equal(allowed_rows(stats.pattern, r0, r1, 6), dense[:, r0:r1])


@pytest.mark.parametrize(("name", "cfg"), CASES + [("full", {})], ids=[c[0] for c in CASES] + ["full"])
def test_compare_against_reference(name, cfg):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 97, 16), torch.randn(1, 3, 97, 16), torch.randn(1, 3, 97, 16)
    scale = 0.25
    out, stats = attnkit.attention(q, k, v, method=name, causal=True, scale=scale, return_stats=True, **cfg)
    got = compare(q, k, v, out, stats.pattern, scale, chunk=32)
    # Independent computation: dense float64 softmax and the reference of the exact output.
    exact = _dense(q, k, v, scale)[0]
    err = (out.double() - exact).norm() / exact.norm()
    assert got["rel_error"] == pytest.approx(err.item(), rel=1e-6, abs=1e-9)
    p = _dense(q, k, v, scale)[1]
    mask = torch.ones(6, 97, 97, dtype=torch.bool) if stats.pattern is None else stats.pattern.dense_mask(1, 6)[0]
    recall = (p * mask).sum().item() / (6 * 97)
    assert got["recall"] == pytest.approx(recall, rel=1e-9)
    if name == "full":
        assert got["rel_error"] < 1e-5 and got["recall"] == pytest.approx(1.0)
    else:
        assert 0 < got["recall"] < 1 and got["rel_error"] > 1e-4


def test_cached_reference_and_recall_row_stride():
    """The shared exact output gives the same error; a row stride measures the recall on
    every k-th chunk of rows only (the dense reference restricted to those rows)."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 6, 97, 16), torch.randn(1, 3, 97, 16), torch.randn(1, 3, 97, 16)
    out, stats = attnkit.attention(q, k, v, method="streaming", causal=True, scale=0.25, return_stats=True,
                                   sink=2, window=9)
    ref = exact_output(q, k, v, 0.25, chunk=32)
    assert torch.allclose(ref, _dense(q, k, v, 0.25)[0][0], atol=1e-12)
    plain = compare(q, k, v, out, stats.pattern, 0.25, chunk=32)
    cached = compare(q, k, v, out, stats.pattern, 0.25, chunk=32, reference=ref, recall_stride=2)
    assert cached["rel_error"] == pytest.approx(plain["rel_error"], rel=1e-12)
    p = _dense(q, k, v, 0.25)[1].reshape(6, 97, 97)
    rows = torch.cat([torch.arange(0, 32), torch.arange(64, 96)])  # chunks 0 and 2 of 32 rows
    mask = stats.pattern.dense_mask(1, 6).reshape(6, 97, 97)
    expected = (p[:, rows] * mask[:, rows]).sum().item() / (6 * rows.numel())
    assert cached["recall"] == pytest.approx(expected, rel=1e-9)
    assert cached["recall"] != pytest.approx(plain["recall"], rel=1e-6)


def _dense(q, k, v, scale):
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    logits = q.double() @ kk.transpose(-1, -2) * scale
    n = q.shape[2]
    logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    p = logits.softmax(-1)
    return p @ vv, p[0]


def test_dense_layers_run_full_on_the_layers_they_cover():
    """A method spec with dense_layers=N measures `full` on layers below N (as the model
    patch runs them) and the method on the others; no model needed (captured q/k/v given)."""
    from attnkit.bench.parse import parse_method
    from attnkit.bench.spec import TaskSpec
    from attnkit.bench.tasks import Case, Context
    from attnkit.bench.tasks.fidelity import Fidelity

    torch.manual_seed(1)
    cap = {"q": torch.randn(1, 6, 97, 16), "k": torch.randn(1, 3, 97, 16), "v": torch.randn(1, 3, 97, 16), "scale": None}
    ctx = Context("none", memo={("fidelity", 97, 0): {2: cap, 5: cap}})
    task = Fidelity()
    spec = TaskSpec("fidelity", [97], [], 1, [], params=Fidelity.Params(layers=[2, 5]))
    method = parse_method("streaming(sink=2,window=8,dense_layers=3)")
    below = task.measure(ctx, Case("layer2", 97, None, 0, 0), method, spec)
    above = task.measure(ctx, Case("layer5", 97, None, 0, 0), method, spec)
    assert below["density"] == 1.0 and below["rel_error"] < 1e-6
    plain = task.measure(ctx, Case("layer5", 97, None, 0, 0), parse_method("streaming(sink=2,window=8)"), spec)
    assert above["density"] == plain["density"] < 0.5 and above["rel_error"] == plain["rel_error"] > 1e-3


def test_capture_survives_a_library_that_rewrapped_the_attention_functions(smollm2, monkeypatch):
    """kvpress wraps every registered attention function at import through
    ALL_ATTENTION_FUNCTIONS[name] = ..., an instance entry that shadows later register()
    calls: a second capture must still reach its own layers (it once saw none)."""
    pytest.importorskip("transformers")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from attnkit.bench.tasks.fidelity import capture_qkv

    monkeypatch.setattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", dict(ALL_ATTENTION_FUNCTIONS._local_mapping))
    ids = torch.arange(100, 164).view(1, 64)
    assert sorted(capture_qkv(smollm2.model, ids, [1])) == [1]
    for name, func in list(ALL_ATTENTION_FUNCTIONS.items()):  # what kvpress does at import

        def wrapped(*args, _func=func, **kwargs):
            return _func(*args, **kwargs)

        ALL_ATTENTION_FUNCTIONS[name] = wrapped
    captured = capture_qkv(smollm2.model, ids, [2, 4])
    assert sorted(captured) == [2, 4] and captured[4]["q"].shape == (1, 9, 64, 64)


LINEAR_FIDELITY = ["linear", "performer", "cosformer", "based", "hedgehog", "retnet", "lightning", "gla", "delta",
                   "gated_delta", "kda", "sigmoid"]


def _fake_capture_task():
    """The fidelity task on a fake capture (SmolLM2's grouping, 6 query / 3 KV heads); no model."""
    from attnkit.bench.spec import TaskSpec
    from attnkit.bench.tasks import Context
    from attnkit.bench.tasks.fidelity import Fidelity

    torch.manual_seed(2)
    cap = {"q": torch.randn(1, 6, 97, 16), "k": torch.randn(1, 3, 97, 16), "v": torch.randn(1, 3, 97, 16), "scale": None}
    ctx = Context("none", memo={("fidelity", 97, 0): {2: cap}})
    spec = TaskSpec("fidelity", [97], [], 1, [], params=Fidelity.Params(layers=[2]))
    return Fidelity(), ctx, spec, cap


@pytest.mark.parametrize("name", LINEAR_FIDELITY)
def test_linear_methods_on_captured_qkv(name):
    """Linear methods report their rel. error against softmax on captured q/k/v: no pattern,
    so recall None; density None for the state-based methods (sigmoid: its own, 1.0 without
    a window); generated g / beta (seeded: the same numbers twice)."""
    from attnkit.bench.parse import parse_method
    from attnkit.bench.tasks import Case

    task, ctx, spec, cap = _fake_capture_task()
    case = Case("layer2", 97, None, 0, 0)
    got = task.measure(ctx, case, parse_method(name), spec)
    assert got["recall"] is None
    assert got["density"] is None if name != "sigmoid" else got["density"] == pytest.approx(1.0)
    assert math.isfinite(got["rel_error"]) and got["rel_error"] > 1e-3 and got["score"] == got["rel_error"]
    needs = {"gla": ["g"], "delta": ["beta"], "gated_delta": ["beta", "g"], "kda": ["beta", "g"]}.get(name)
    assert got.get("generated_inputs") == needs
    assert task.measure(ctx, case, parse_method(name), spec)["rel_error"] == got["rel_error"]


def test_linear_fidelity_error_is_the_methods_own_output():
    """The task's error is ||o - o*|| / ||o*|| of the method's output on the captured
    q/k/v (delta rule: K/V heads repeated to the query heads; g / beta as generated)."""
    from attnkit.bench.linear_inputs import method_inputs
    from attnkit.bench.parse import parse_method
    from attnkit.bench.tasks import Case, case_seed

    task, ctx, spec, cap = _fake_capture_task()
    q, k, v = cap["q"], cap["k"], cap["v"]
    for name in ("retnet", "gated_delta"):
        got = task.measure(ctx, Case("layer2", 97, None, 0, 0), parse_method(name), spec)
        kk, vv = (k, v) if name == "retnet" else (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
        inputs = method_inputs(attnkit.get(name), q, kk, vv, seed=case_seed(0, "fidelity_inputs", 97, 0))
        out = attnkit.attention(q, kk, vv, method=name, causal=True, **inputs)
        exact = _dense(q, k, v, 16 ** -0.5)[0]
        assert got["rel_error"] == pytest.approx(((out.double() - exact).norm() / exact.norm()).item(), rel=1e-6)


def test_non_causal_only_method_is_not_applicable():
    from attnkit.bench.parse import parse_method
    from attnkit.bench.tasks import Case
    from attnkit.errors import NotApplicable

    task, ctx, spec, _ = _fake_capture_task()
    with pytest.raises(NotApplicable, match="non-causal only"):
        task.measure(ctx, Case("layer2", 97, None, 0, 0), parse_method("agent"), spec)
