"""The linear family's quadratic, softmax-free methods: ``sigmoid`` (its own blockwise
kernel, forward and backward) and ``agent``, each equal to its dense float64 formula in
``reference.py``, differentiable, and without an N x N tensor where it promises none."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import attnkit as ak
from attnkit.bench.speed import PeakMemory
from attnkit.methods.linear import sigmoid
from attnkit.reference import agent_attention, sigmoid_attention

TOL = 1e-12


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(b=2, hq=4, h=2, nq=37, nk=37, d=8, dv=6, dtype=torch.float64, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, h, nk, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h, nk, dv, generator=gen, dtype=torch.float64).to(dtype)
    return tuple(t.requires_grad_() for t in (q, k, v)) if grad else (q, k, v)


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() / max(1.0, b.double().abs().max().item())


# --- sigmoid ---------------------------------------------------------------------------

SIGMOID = [(causal, window, nq, nk) for causal in (True, False) for window in (0, 7, 50) for nq, nk in ((37, 37), (13, 37))]


@pytest.mark.parametrize("causal,window,nq,nk", SIGMOID,
                         ids=[f"{'causal' if c else 'noncausal'}-W{w}-Nq{a}-Nk{b}" for c, w, a, b in SIGMOID])
def test_sigmoid_equals_the_dense_formula(causal, window, nq, nk):
    q, k, v = make(nq=nq, nk=nk, seed=nq + window)
    expected = sigmoid_attention(q, k, v, causal=causal, window=window)
    for block in (8, 16, 256):
        out, stats = ak.attention(q, k, v, method="sigmoid", causal=causal, window=window, block_size=block,
                                  return_stats=True)
        assert out.shape == expected.shape and out.dtype == torch.float64
        assert _err(out, expected) < TOL, block
    allowed = sigmoid_attention(q, k, torch.ones_like(v[..., :1]), causal=causal, window=window, bias=1e9)
    assert stats.density == pytest.approx(allowed.sum().item() / (2 * 4) / (nq * nk if not causal else
                                                                            nq * (nk - nq) + nq * (nq + 1) / 2))


def test_sigmoid_bias_is_minus_log_n_or_the_given_constant():
    q, k, v = make(nq=20, nk=20, seed=3)
    default = ak.attention(q, k, v, method="sigmoid", causal=True)
    assert _err(default, sigmoid_attention(q, k, v, causal=True, bias=-math.log(20))) < TOL
    given = ak.attention(q, k, v, method="sigmoid", causal=True, bias=-1.5, scale=0.3)
    assert _err(given, sigmoid_attention(q, k, v, causal=True, bias=-1.5, scale=0.3)) < TOL


def test_sigmoid_skips_tiles_outside_the_band():
    """A window of W keys visits about N / block x (W / block + 1) tiles, not (N / block)^2 / 2,
    and masks only the tiles that straddle the band's edges."""
    tiles = list(sigmoid.tiles(4096, 4096, True, 256, 256))
    assert len(tiles) <= 2 * 16 and sum(not full for *_, full in tiles) <= 2 * 16
    causal = list(sigmoid.tiles(4096, 4096, True, 0, 256))
    assert len(causal) == 16 * 17 // 2 and sum(not full for *_, full in causal) == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sigmoid_low_precision(dtype):
    q, k, v = make(nq=70, nk=70, d=16, dv=16, dtype=dtype, seed=4)
    out = ak.attention(q, k, v, method="sigmoid", causal=True, window=20, block_size=16)
    assert out.dtype == dtype
    expected = sigmoid_attention(q, k, v, causal=True, window=20)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert ((out.double() - expected).norm() / expected.norm()).item() < tol


@pytest.mark.parametrize("causal,window,nq,nk", [(True, 0, 9, 9), (True, 4, 6, 11), (False, 0, 7, 10), (False, 3, 9, 9)])
def test_sigmoid_gradcheck(causal, window, nq, nk):
    q, k, v = make(b=1, hq=2, h=1, nq=nq, nk=nk, d=3, dv=2, seed=1, grad=True)
    fn = lambda q, k, v: ak.attention(q, k, v, method="sigmoid", causal=causal, window=window, block_size=4)
    assert gradcheck(fn, (q, k, v), atol=1e-9)


@pytest.mark.parametrize("causal,window", [(True, 0), (True, 23), (False, 17)])
def test_sigmoid_gradients_equal_the_oracle(causal, window):
    q, k, v = make(nq=61, nk=75, seed=7, grad=True)
    dout = torch.randn(2, 4, 61, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = ak.attention(q, k, v, method="sigmoid", causal=causal, window=window, block_size=16)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected = torch.autograd.grad(sigmoid_attention(q, k, v, causal=causal, window=window), (q, k, v), dout)
    for name, g, e in zip("qkv", grads, expected):
        assert _err(g, e) < 1e-11, name


def test_sigmoid_8k_without_an_n_by_n_tensor():
    """N = 8192: forward and backward memory grow far less than one N x N float32 matrix
    (256 MiB), and autograd saves q, k, v only (recorded with saved_tensors_hooks): the
    backward recomputes its tiles."""
    n, d = 8192, 32
    q, k, v = make(b=1, hq=2, h=1, nq=n, nk=n, d=d, dv=d, dtype=torch.float32, seed=5)
    with torch.no_grad(), PeakMemory() as mem:
        out = ak.attention(q, k, v, method="sigmoid", causal=True)
    assert torch.isfinite(out).all()
    assert mem.grown < 64 * 2**20, f"grew {mem.grown / 2**20:.0f} MiB (N*N*4 = {n * n * 4 / 2**20:.0f} MiB)"
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ak.attention(q, k, v, method="sigmoid", causal=True, window=1024)
    dout = torch.ones_like(out)
    with PeakMemory() as mem:
        out.backward(dout)
    assert mem.grown < 64 * 2**20, f"backward grew {mem.grown / 2**20:.0f} MiB"
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert max(sizes) <= 2 * n * d and sum(sizes) <= 4 * n * d, sizes


# --- agent -----------------------------------------------------------------------------

AGENT = [(37, 37, 5), (13, 37, 4), (10, 10, 49), (40, 23, 49), (64, 64, 8)]


@pytest.mark.parametrize("nq,nk,agents", AGENT, ids=[f"Nq{a}-Nk{b}-n{c}" for a, b, c in AGENT])
def test_agent_equals_the_dense_formula(nq, nk, agents):
    q, k, v = make(nq=nq, nk=nk, seed=nq + agents)
    out = ak.attention(q, k, v, method="agent", agents=agents)
    expected = agent_attention(q, k, v, agents)
    assert out.shape == expected.shape and _err(out, expected) < TOL


def test_agent_default_agents_and_scale():
    assert ak.method_info("agent").config == {"agents": 49}
    q, k, v = make(nq=100, nk=100, seed=2)
    assert _err(ak.attention(q, k, v, method="agent", scale=0.2), agent_attention(q, k, v, 49, scale=0.2)) < TOL


def test_agent_float32():
    q, k, v = make(nq=300, nk=300, d=16, dv=16, dtype=torch.float32, seed=9)
    out = ak.attention(q, k, v, method="agent", agents=16)
    assert out.dtype == torch.float32
    expected = agent_attention(q, k, v, 16)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-6


def test_agent_gradcheck():
    q, k, v = make(b=1, hq=2, h=1, nq=9, nk=7, d=3, dv=2, seed=1, grad=True)
    assert gradcheck(lambda q, k, v: ak.attention(q, k, v, method="agent", agents=4), (q, k, v), atol=1e-9)


def test_agent_memory_is_linear_in_n():
    """Autograd keeps O(N n) for agent attention: doubling N doubles what it saves."""
    def saved(n):
        q, k, v = make(b=1, hq=2, h=1, nq=n, nk=n, d=16, dv=16, dtype=torch.float32, grad=True)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            ak.attention(q, k, v, method="agent", agents=49).sum().backward()
        return sum(sizes), max(sizes)

    (total, largest), (total2, largest2) = saved(2048), saved(4096)
    assert total2 < 2.2 * total and largest2 <= 2 * 4096 * 49


# --- registry and errors -----------------------------------------------------------------


def test_registered_with_info():
    from typer.testing import CliRunner

    from attnkit.cli import app

    names = {i.name for i in ak.methods(family="linear")}
    assert {"sigmoid", "agent"} <= names
    assert ak.method_info("sigmoid").arxiv == "2409.04431" and ak.method_info("agent").arxiv == "2312.08275"
    assert ak.method_info("agent").supports == ("non_causal", "gqa")
    shown = CliRunner().invoke(app, ["info", "sigmoid"])
    assert shown.exit_code == 0 and "2409.04431" in shown.output and "window=0" in shown.output


def _qkv():
    return make(b=1, hq=2, h=2, nq=10, nk=10, d=4, dv=4, dtype=torch.float32)


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: ak.attention(q, k, v, method="sigmoid", causal=True, return_lse=True),
     r"return_lse=True: method 'sigmoid' has no softmax normaliser"),
    (lambda q, k, v: ak.attention(q, k, v, method="sigmoid", causal=True, return_state=True),
     r"return_state=True: method 'sigmoid' has no recurrent state"),
    (lambda q, k, v: ak.attention(q, k, v, method="agent", return_lse=True),
     r"return_lse=True: method 'agent' has no softmax normaliser"),
    (lambda q, k, v: ak.attention(q, k, v, method="agent", return_state=True),
     r"return_state=True: method 'agent' has no recurrent state"),
    (lambda q, k, v: ak.attention(q, k, v, method="agent", causal=True),
     r"'agent' is non-causal only, as published"),
    (lambda q, k, v: ak.attention(q, k, v, method="sigmoid", backend="gather"),
     r"runs its own kernel.*backend must be 'auto'"),
    (lambda q, k, v: ak.attention(q, k, v, method="sigmoid", window=-1),
     r"window"),
    (lambda q, k, v: ak.attention(q, k, v, method="sigmoid", bias=float("inf")),
     r"bias of method 'sigmoid' must be a finite float"),
    (lambda q, k, v: ak.attention(q, k, v, method="agent", agents=0),
     r"agents"),
], ids=["sigmoid-lse", "sigmoid-state", "agent-lse", "agent-state", "agent-causal", "backend", "window", "bias",
        "agents"])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(*_qkv())


@pytest.mark.parametrize("name,config,causal", [("sigmoid", {"block_size": 8}, True), ("agent", {"agents": 5}, False)])
def test_non_contiguous_inputs(name, config, causal):
    """q, k, v as transformers holds them: (B, N, H, D) transposed to (B, H, N, D)."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in make(nq=30, nk=30, seed=8))
    assert not q.is_contiguous()
    out = ak.attention(q, k, v, method=name, causal=causal, **config)
    expected = ak.attention(*(t.detach().contiguous() for t in (q, k, v)), method=name, causal=causal, **config)
    assert _err(out, expected) < TOL
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(v.grad).all()
