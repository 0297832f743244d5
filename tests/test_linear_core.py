"""The linear family's foundation: every form of every method equals the float64
per-token recurrence (``reference.linear_recurrence``), states carry a sequence across
calls, gradients are exact, bad inputs get clear errors, the chunked form runs long
sequences without an N x N tensor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import attnkit as ak
from attnkit import validate
from attnkit.bench.speed import PeakMemory
from attnkit.methods.linear import KVState, LinearState, chunked
from attnkit.reference import linear_recurrence

FORMS = ("chunk", "recurrent", "parallel")


@pytest.fixture(autouse=True)
def one_thread():
    """The chunk loop is many small matmuls: on a loaded machine, intra-op threads that
    wait for each other make it 10-100x slower (same results); run these tests on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
LINEAR = sorted(i.name for i in ak.methods(family="linear") if i.name in ("linear", "retnet", "lightning", "gla"))
TOL = 1e-10


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() / max(1.0, b.double().abs().max().item())


def make(b=2, hq=4, h=2, n=37, dk=8, dv=6, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, dk, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, h, n, dk, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h, n, dv, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def gates(b, h, n, dk, per_channel=True, seed=1, strength=2.0):
    """Log-space gates <= 0, some of them strongly negative."""
    gen = torch.Generator().manual_seed(seed)
    shape = (b, h, n, dk) if per_channel else (b, h, n)
    return F.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64) * 3) * strength


# The oracle's decays, written from the papers (not imported from the methods).
def retnet_g(b, h, n):
    gamma = torch.tensor([1 - 2 ** (-5 - i) for i in range(h)], dtype=torch.float64)
    return gamma.log()[None, :, None].expand(b, h, n)


def lightning_g(b, h, n):
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], dtype=torch.float64)
    return (-slopes)[None, :, None].expand(b, h, n)


def oracle_kwargs(name: str, config: dict, inputs: dict, q, k) -> dict:
    """linear_recurrence's arguments for method ``name``."""
    b, h, n, dk = k.shape
    state = inputs.get("initial_state")
    kw = {"scale": 1.0 / math.sqrt(dk), "initial_state": None if state is None else state.S}
    if name == "linear":
        kw.update(scale=1.0, feature_map=config.get("feature_map", "elu1"), normalize=config.get("normalize", True))
        kw["initial_z"] = None if state is None else state.z
    elif name == "retnet":
        kw["g"] = retnet_g(b, h, n)
    elif name == "lightning":
        kw.update(g=lightning_g(b, h, n) * config.get("decay_scale", 1.0), scale=1.0)
    elif name == "gla":
        kw["g"] = inputs["g"]
    return kw


def method_inputs(name, k, per_channel=True, seed=1):
    b, h, n, dk = k.shape
    return {"g": gates(b, h, n, dk, per_channel, seed)} if name == "gla" else {}


def random_state(name, k, v, config, seed=5):
    gen = torch.Generator().manual_seed(seed)
    b, h, dk, dv = k.shape[0], k.shape[1], k.shape[-1], v.shape[-1]
    S = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    if name == "linear":
        z = torch.rand(b, h, dk, generator=gen, dtype=torch.float64) * 5 + 1 if config.get("normalize", True) else None
        return LinearState(S=S.abs() if config.get("feature_map", "elu1") != "identity" else S, z=z)
    return KVState(S=S)


CASES = [
    ("linear", {"feature_map": "elu1"}, True),
    ("linear", {"feature_map": "elu1"}, False),
    ("linear", {"feature_map": "relu", "normalize": False}, True),
    ("linear", {"feature_map": "identity", "normalize": False}, False),
    ("retnet", {}, True),
    ("lightning", {}, True),
    ("lightning", {"decay_scale": 0.3}, True),
    ("gla", {}, True),
]


@pytest.mark.parametrize("with_state", [False, True], ids=["s0-none", "s0-given"])
@pytest.mark.parametrize("n,chunk", [(37, 16), (130, 48), (130, 20)], ids=["N37-C16", "N130-C48", "N130-C20"])
@pytest.mark.parametrize("name,config,causal", CASES,
                         ids=[f"{n}-{'-'.join(map(str, c.values())) or 'default'}-{'causal' if ca else 'noncausal'}"
                              for n, c, ca in CASES])
def test_every_form_equals_the_recurrence(name, config, causal, n, chunk, with_state):
    q, k, v = make(n=n, seed=n + chunk)
    inputs = method_inputs(name, k)
    if with_state:
        inputs["initial_state"] = random_state(name, k, v, config)
    expected, S, z = linear_recurrence(q, k, v, causal=causal, **oracle_kwargs(name, config, inputs, q, k))
    for form in FORMS:
        out, state = ak.attention(q, k, v, method=name, causal=causal, form=form, chunk_size=chunk,
                                  return_state=True, **config, **inputs)
        assert out.shape == expected.shape and out.dtype == torch.float64
        assert _max_err(out, expected) < TOL, f"{form}: out off by {_max_err(out, expected):.2e}"
        assert _max_err(state.S, S) < TOL, f"{form}: state"
        if z is not None:
            assert _max_err(state.z, z) < TOL, f"{form}: normaliser"


@pytest.mark.parametrize("form", FORMS)
def test_gla_per_head_gates_equal_the_recurrence(form):
    q, k, v = make(n=70, seed=3)
    g = gates(2, 2, 70, 8, per_channel=False)
    out = ak.attention(q, k, v, method="gla", causal=True, g=g, form=form, chunk_size=32)
    expected, _, _ = linear_recurrence(q, k, v, g=g, scale=8 ** -0.5)
    assert _max_err(out, expected) < TOL


@pytest.mark.parametrize("span", [0.0, 1.0])
def test_gla_block_halving_equals_the_recurrence(monkeypatch, span):
    """SPAN 0: every block is halved down to single tokens; 1: some levels, then matmuls."""
    monkeypatch.setattr(chunked, "SPAN", span)
    q, k, v = make(n=75, seed=8)
    g = gates(2, 2, 75, 8, seed=4, strength=0.3)
    expected, _, _ = linear_recurrence(q, k, v, g=g, scale=8 ** -0.5)
    for chunk in (16, 24):
        out = ak.attention(q, k, v, method="gla", causal=True, g=g, form="chunk", chunk_size=chunk)
        assert _max_err(out, expected) < TOL, chunk


@pytest.mark.parametrize("name", LINEAR)
def test_non_contiguous_inputs(name):
    """q, k, v as transformers holds them: (B, N, H, D) transposed to (B, H, N, D)."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make(n=70, seed=12))
    assert not q.is_contiguous()
    inputs = method_inputs(name, k)
    for form in FORMS:
        out = ak.attention(q, k, v, method=name, causal=True, form=form, **inputs)
        expected = ak.attention(q.contiguous(), k.contiguous(), v.contiguous(), method=name, causal=True, form=form,
                                **inputs)
        assert _max_err(out, expected) < TOL, form


def test_strong_gates_stay_finite_and_exact():
    """log-decays of -30 per token: exp of a positive cumulative sum would overflow."""
    q, k, v = make(b=1, n=96, seed=4)
    for seed in range(8):  # seeded: fp32 error over 40 seeds is 2e-6 .. 1.5e-5 (relative to max |o|)
        g = -30.0 * torch.rand(1, 2, 96, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        expected, _, _ = linear_recurrence(q, k, v, g=g, scale=8 ** -0.5)
        out = ak.attention(q.float(), k.float(), v.float(), method="gla", causal=True, g=g.float(), form="chunk")
        assert torch.isfinite(out).all() and _max_err(out, expected) < 5e-5, seed


@pytest.mark.parametrize("name", LINEAR)
def test_split_sequence_with_state_equals_one_shot(name):
    q, k, v = make(n=101, seed=9)
    inputs = method_inputs(name, k)
    whole, final = ak.attention(q, k, v, method=name, causal=True, return_state=True, chunk_size=32, **inputs)
    cut = 45
    first = {key: t[:, :, :cut] for key, t in inputs.items()}
    second = {key: t[:, :, cut:] for key, t in inputs.items()}
    out1, state = ak.attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], method=name, causal=True,
                               return_state=True, chunk_size=32, **first)
    out2, state2 = ak.attention(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], method=name, causal=True,
                                initial_state=state, return_state=True, chunk_size=32, **second)
    assert _max_err(torch.cat([out1, out2], dim=2), whole) < TOL
    assert _max_err(state2.S, final.S) < TOL


@pytest.mark.parametrize("name", LINEAR)
def test_decode_token_by_token_uses_the_recurrent_form(name):
    q, k, v = make(b=1, n=24, seed=2)
    inputs = method_inputs(name, k)
    whole = ak.attention(q, k, v, method=name, causal=True, **inputs)
    prefix = 20
    head = {key: t[:, :, :prefix] for key, t in inputs.items()}
    _, state, stats = ak.attention(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], method=name, causal=True,
                                   return_state=True, return_stats=True, **head)
    assert stats.backend == "chunk"
    for t in range(prefix, 24):
        step = {key: x[:, :, t:t + 1] for key, x in inputs.items()}
        out, state, stats = ak.attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], method=name,
                                         causal=True, initial_state=state, return_state=True, return_stats=True,
                                         **step)
        assert stats.backend == "recurrent"
        assert _max_err(out, whole[:, :, t:t + 1]) < TOL
        state = state.detach()
        assert type(state).__name__ == ("LinearState" if name == "linear" else "KVState")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", LINEAR)
def test_low_precision_inputs_keep_a_float32_state(name, dtype):
    q, k, v = make(b=1, n=50, dtype=dtype, seed=6)
    inputs = {key: t.to(dtype) for key, t in method_inputs(name, k.double()).items()}
    out, state = ak.attention(q, k, v, method=name, causal=True, return_state=True, **inputs)
    assert out.dtype == dtype and state.S.dtype == torch.float32
    expected = ak.attention(q.double(), k.double(), v.double(), method=name, causal=True,
                            **{key: t.double() for key, t in inputs.items()})
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert ((out.double() - expected).norm() / expected.norm()).item() < tol


# --- gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("per_channel,span", [(True, 0.0), (True, 16.0), (False, 0.0), (False, 16.0)],
                         ids=["per-channel-halving", "per-channel-one-matmul", "per-head-decay-matrix", "per-head-one-matmul"])
def test_gla_chunk_gradcheck(monkeypatch, per_channel, span):
    monkeypatch.setattr(chunked, "SPAN", span)  # 0: the strong-decay paths (halving to single tokens; decay matrix)
    gen = torch.Generator().manual_seed(0)
    n = 13
    q = torch.randn(1, 2, n, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, n, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, n, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    g = gates(1, 1, n, 3, per_channel, strength=0.5).requires_grad_()
    s0 = torch.randn(1, 1, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, g, s0):
        out, state = ak.attention(q, k, v, method="gla", causal=True, g=g, initial_state=KVState(S=s0),
                                  form="chunk", chunk_size=8, return_state=True)
        return out, state.S

    assert gradcheck(fn, (q, k, v, g, s0), atol=1e-8)


@pytest.mark.parametrize("name,config,causal", [("linear", {}, True), ("linear", {}, False), ("retnet", {}, True)])
def test_chunk_gradcheck(name, config, causal):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 10, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: ak.attention(q, k, v, method=name, causal=causal, form="chunk", chunk_size=4, **config)
    assert gradcheck(fn, (q, k, v), atol=1e-8)


# --- form choice and errors -----------------------------------------------------------


def test_form_is_chosen_by_one_function():
    assert chunked.choose_form("auto", 1) == "recurrent"
    assert chunked.choose_form("auto", 2) == "chunk"
    assert chunked.choose_form("parallel", 1) == "parallel"


def _qkv():
    return make(b=1, hq=2, h=2, n=10, dk=4, dv=4, dtype=torch.float32)


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: ak.attention(q, k, v, method="gla", causal=True, g=torch.full((1, 2, 10, 4), 0.5)),
     ValueError, r"g is a log-space decay and must be <= 0"),
    (lambda q, k, v: ak.attention(q, k, v, method="gla", causal=True, g=torch.zeros(1, 2, 9, 4)),
     ValueError, r"g must have shape \(1, 2, 10\) or \(1, 2, 10, 4\)"),
    (lambda q, k, v: ak.attention(q, k, v, method="gla", causal=True),
     ValueError, r"'gla' needs its gates: pass g"),
    (lambda q, k, v: ak.attention(q, k, v, method="gla", causal=True, g=torch.full((1, 2, 10), float("nan"))),
     ValueError, r"g contains NaN/-inf"),
    (lambda q, k, v: ak.attention(q, k, v, method="retnet", causal=True, initial_state=KVState(torch.zeros(1, 2, 4, 5))),
     ValueError, r"initial_state.S must have shape \(1, 2, 4, 4\)"),
    (lambda q, k, v: ak.attention(q, k, v, method="retnet", causal=True,
                                  initial_state=KVState(torch.zeros(1, 2, 4, 4, dtype=torch.float64))),
     TypeError, r"initial_state.S must be torch.float32 for torch.float32 inputs"),
    (lambda q, k, v: ak.attention(q, k, v, method="retnet", causal=True, initial_state=torch.zeros(1, 2, 4, 4)),
     TypeError, r"initial_state of method 'retnet' must be a KVState"),
    (lambda q, k, v: ak.attention(q, k, v, method="linear", causal=True, initial_state=KVState(torch.zeros(1, 2, 4, 4))),
     TypeError, r"must be a LinearState"),
    (lambda q, k, v: ak.attention(q, k, v, method="gla", causal=True, g=torch.zeros(1, 2, 10), return_lse=True),
     ValueError, r"return_lse=True: method 'gla' is a linear method and has no softmax normaliser"),
    (lambda q, k, v: ak.attention(q, k, v, method="gla", causal=True, g=torch.zeros(1, 2, 10), gates=1),
     ValueError, r"valid fields with defaults: form='auto', chunk_size=64; per-call inputs: g, initial_state"),
    (lambda q, k, v: ak.get("gla")(q, k, v, causal=True, beta=torch.zeros(1, 2, 10)),
     ValueError, r"per-call inputs: g, initial_state; config fields: form, chunk_size"),
    (lambda q, k, v: ak.attention(q, k, v, method="linear", form="fast"),
     ValueError, r"form of method 'linear' must be one of 'auto', 'chunk', 'recurrent', 'parallel'"),
    (lambda q, k, v: ak.attention(q, k[:, :, :5], v[:, :, :5], method="linear", causal=True),
     ValueError, r"needs Nq == Nk"),
    (lambda q, k, v: ak.attention(q, k, v, method="retnet", causal=False),
     ValueError, r"does not support causal=False"),
    (lambda q, k, v: ak.attention(q, k, v, method="linear", backend="gather"),
     ValueError, r"picks a form"),
    (lambda q, k, v: ak.attention(q, k, v, method="full", return_state=True),
     ValueError, r"'full' is not a linear method"),
    (lambda q, k, v: validate.check_beta(torch.full((1, 2, 10), 1.5), 1, 2, 10, q),
     ValueError, r"beta must lie in \[0, 1\]"),
    (lambda q, k, v: validate.check_beta(torch.zeros(1, 2, 9), 1, 2, 10, q),
     ValueError, r"beta must have shape \(1, 2, 10\)"),
], ids=["positive-g", "g-shape", "gla-no-g", "g-nan", "state-shape", "state-dtype", "state-bare-tensor", "state-class",
        "lse", "unknown-config", "unknown-input", "form", "lengths", "noncausal", "backend", "state-softmax",
        "beta-range", "beta-shape"])
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(*_qkv())


def test_value_head_grouping_check():
    q = k = torch.zeros(1, 2, 4, 8)
    assert validate.check_linear_heads(q, k, torch.zeros(1, 6, 4, 8), grouping="value") == 6
    with pytest.raises(ValueError, match="multiple of the q/k heads"):
        validate.check_linear_heads(q, k, torch.zeros(1, 3, 4, 8), grouping="value")


def test_registered_with_info():
    from typer.testing import CliRunner

    from attnkit.cli import app

    names = {i.name for i in ak.methods(family="linear")}
    assert {"linear", "retnet", "lightning", "gla"} <= names
    info = ak.method_info("gla")
    assert info.arxiv == "2312.06635" and "decode" in info.supports and info.config["form"] == "auto"
    shown = CliRunner().invoke(app, ["info", "gla"])
    assert shown.exit_code == 0 and "2312.06635" in shown.output and "chunk_size=64" in shown.output
    assert "per-call inputs: g, initial_state" in shown.output


# --- long sequences: no N x N tensor ---------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "retnet", "gla"])
def test_chunk_form_runs_16k_without_quadratic_memory(name):
    n, d, h = 16384, 64, 2
    q, k, v = make(b=1, hq=h, h=h, n=n, dk=d, dv=d, dtype=torch.float32)
    inputs = {"g": gates(1, h, n, d, seed=3).float()} if name == "gla" else {}
    with torch.no_grad(), PeakMemory() as mem:
        out = ak.attention(q, k, v, method=name, causal=True, **inputs)
    assert torch.isfinite(out).all()
    assert mem.grown < 256 * 2**20, f"{name}: grew {mem.grown / 2**20:.0f} MiB (N*N*4 = {n * n * 4 / 2**20:.0f} MiB)"


def _saved_elements(name: str, n: int, d: int = 64) -> tuple[int, int]:
    """(largest, total) elements autograd saves for backward of the chunked form."""
    q, k, v = (t.requires_grad_() for t in make(b=1, hq=1, h=1, n=n, dk=d, dv=d, dtype=torch.float32))
    inputs = {"g": (gates(1, 1, n, d, seed=3).float() / 8).requires_grad_()} if name == "gla" else {}
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ak.attention(q, k, v, method=name, causal=True, **inputs)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(q.grad).all()
    return max(sizes), sum(sizes)


@pytest.mark.parametrize("name", ["linear", "retnet", "gla"])
def test_chunk_backward_saves_nothing_quadratic(name):
    """What autograd keeps for backward (recorded with saved_tensors_hooks) is O(N D):
    doubling N doubles it, and no saved tensor is bigger than a few (N, D)."""
    n, d = 2048, 64
    largest, total = _saved_elements(name, n, d)
    largest2, total2 = _saved_elements(name, 2 * n, d)
    assert largest2 <= 2 * (2 * n) * (d + 1), f"largest saved tensor at N={2 * n}: {largest2} elements"
    assert total2 < 2.2 * total, f"saved {total} elements at N={n}, {total2} at N={2 * n}: not linear in N"


def test_patch_refuses_a_linear_method_for_softmax_layers():
    from attnkit import patching
    from attnkit.patching import LayerMethod

    with pytest.raises(ValueError, match="not a drop-in for a softmax attention layer"):
        patching._check_method(LayerMethod("gla", {}, "auto"))


@pytest.mark.parametrize("decay", ["none", "per_head", "per_channel", "constant", "constant_strong"])
def test_chunk_rows_carry_the_state_across_rows(monkeypatch, decay):
    """The chunked form runs ROW_CHUNKS chunks at a time; with rows of 2 chunks a length
    of 11 chunks and a bit crosses 6 rows: output, final state and gradients equal the
    float64 recurrence / one row. A decay constant per head takes its own path (one
    (C, C) decay matrix, the states of a row in one matmul), also where exp underflows."""
    monkeypatch.setattr(chunked, "ROW_CHUNKS", 2)
    q, k, v = make(b=2, n=11 * 8 + 3, seed=21)
    constant = torch.tensor([[-0.05, -0.7], [-0.3, 0.0]], dtype=torch.float64)
    g = {"none": None, "per_head": -torch.rand(2, 2, 91, dtype=torch.float64),
         "per_channel": -torch.rand(2, 2, 91, 8, dtype=torch.float64),
         "constant": constant[..., None].expand(2, 2, 91),
         "constant_strong": (constant * 400)[..., None].expand(2, 2, 91)}[decay]
    s0 = torch.randn(2, 2, 8, 6, dtype=torch.float64)
    expected, s_exp, _ = linear_recurrence(q, k, v, g=g, scale=0.5, initial_state=s0)
    out, s = chunked.chunk_gla(q, k, v, g, 0.5, s0, chunk_size=8)
    assert _max_err(out, expected) < TOL and _max_err(s, s_exp) < TOL
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(chunked.chunk_gla(*leaves, g, 0.5, s0, chunk_size=8)[0].square().sum(), leaves)
    monkeypatch.setattr(chunked, "ROW_CHUNKS", 1000)
    ref = torch.autograd.grad(chunked.chunk_gla(*leaves, g, 0.5, s0, chunk_size=8)[0].square().sum(), leaves)
    assert all(_max_err(a, b) < TOL for a, b in zip(grads, ref))


@pytest.mark.parametrize("n", [64, 91])
def test_feature_map_and_normaliser_applied_per_row(monkeypatch, n):
    """``linear`` applies its feature map and the normaliser's division a row of chunks at
    a time inside the kernel (the ones column is zero on the padding): over several rows,
    with an initial state, output, state and gradients equal the recurrence / one row."""
    monkeypatch.setattr(chunked, "ROW_CHUNKS", 2)
    q, k, v = make(b=2, hq=4, h=2, n=n, seed=23)
    inputs = {"initial_state": random_state("linear", k, v, {})}
    expected, S, z = linear_recurrence(q, k, v, **oracle_kwargs("linear", {}, inputs, q, k))
    out, state = ak.attention(q, k, v, method="linear", causal=True, form="chunk", chunk_size=8, return_state=True,
                              **inputs)
    assert _max_err(out, expected) < TOL and _max_err(state.S, S) < TOL and _max_err(state.z, z) < TOL
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def grads():
        out = ak.attention(*leaves, method="linear", causal=True, form="chunk", chunk_size=8, **inputs)
        return torch.autograd.grad(out.square().sum(), leaves)

    rows = grads()
    monkeypatch.setattr(chunked, "ROW_CHUNKS", 1000)
    assert all(_max_err(a, b) < TOL for a, b in zip(rows, grads()))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    recurrence, _, _ = linear_recurrence(*ref, **oracle_kwargs("linear", {}, inputs, q, k))
    expected_grads = torch.autograd.grad(recurrence.square().sum(), ref)
    assert all(_max_err(a, b) < 1e-9 for a, b in zip(rows, expected_grads))


def _backward_nodes(out: torch.Tensor) -> dict[str, int]:
    """Autograd node counts by type in the graph of ``out``."""
    import collections

    seen, counts, stack = set(), collections.Counter(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        counts[type(fn).__name__] += 1
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return counts


@pytest.mark.parametrize("name", ["gated_delta", "kda", "gla", "retnet", "linear"])
def test_chunk_backward_graph_has_no_per_chunk_slices(monkeypatch, name):
    """Slicing chunk i out of a whole-sequence tensor in the chunk loop gives one backward
    node per chunk that zero-fills a whole-sequence gradient (quadratic in the chunk
    count: the delta rule's 16k backward took 23 s). The loops unbind once instead: the
    slice-like nodes do not grow with the length (10 vs 40 chunks, one row of chunks)."""
    monkeypatch.setattr(chunked, "ROW_CHUNKS", 1000)

    def counts(n):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, n, 16, generator=gen, requires_grad=True) for _ in range(3))
        kw = {}
        if name in ("gated_delta", "kda"):
            kw["beta"] = torch.rand(1, 2, n, generator=gen)
        if name in ("gated_delta", "kda", "gla"):
            shape = (1, 2, n) if name == "gated_delta" else (1, 2, n, 16)
            kw["g"] = -torch.rand(shape, generator=gen)
        out = ak.attention(q, k, v, method=name, causal=True, form="chunk", chunk_size=16, **kw)
        c = _backward_nodes(out)
        return sum(c[t] for t in ("SelectBackward0", "CopySlices", "SliceBackward0", "IndexBackward0"))

    assert counts(40 * 16) <= counts(10 * 16) + 3
