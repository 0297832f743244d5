"""Feature-map linear attention (performer, cosformer, based, hedgehog): every form equals
the float64 per-token recurrence (``reference.linear_recurrence``) on feature maps written
here from the papers, states carry a sequence across calls, gradients are exact, bad
configs get clear errors; Performer approaches softmax as m grows; cosFormer equals its
dense formula; Hedgehog's distillation reduces the mimicry loss and the error vs softmax."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import attnkit as ak
from attnkit.methods.linear import CosformerState, LinearState, PerformerState, hedgehog
from attnkit.methods.linear.performer import projection
from attnkit.reference import linear_recurrence

FORMS = ("chunk", "recurrent", "parallel")
TOL = 1e-10
M_FEATURES = 20  # Performer features in the exactness tests: 2 full blocks of Dk = 8 and a partial one


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() / max(1.0, b.double().abs().max().item())


def make(b=2, hq=4, h=2, n=37, dk=8, dv=6, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, hh, n, d, generator=gen, dtype=torch.float64).to(dtype)
               for hh, d in ((hq, dk), (h, dk), (h, dv)))
    return q, k, v


def random_maps(hq=4, h=2, d=8, m=5, seed=3):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64) * 0.5
    return {"wq": r(hq, d, m), "bq": r(hq, m), "wk": r(h, d, m), "bk": r(h, m)}


# --- the feature maps, written from the papers (not imported from the methods) ---------


def performer_phi(x, scale, m=M_FEATURES, seed=0):
    w = projection(m, x.shape[-1], seed)  # the random matrix, drawn once (the method's function)
    xs = x.double() * math.sqrt(scale)
    return torch.exp(xs @ w.t() - (xs * xs).sum(-1, keepdim=True) / 2) / math.sqrt(m)


def cosformer_phi(x, first, big_m):
    pos = torch.arange(first, first + x.shape[2], dtype=torch.float64)
    a = (math.pi / 2 * pos / big_m)[:, None]
    r = torch.relu(x.double())
    return torch.cat([r * torch.cos(a), r * torch.sin(a)], dim=-1)


def taylor_phi(x, scale):
    xs = x.double() * math.sqrt(scale)
    outer = torch.einsum("...i,...j->...ij", xs, xs).flatten(-2) / math.sqrt(2)
    return torch.cat([torch.ones_like(xs[..., :1]), xs, outer], dim=-1)


def hedgehog_phi(x, w, b):
    z = x.double() @ w + b[:, None, :]
    e = torch.cat([z.exp(), (-z).exp()], dim=-1)
    return e / e.sum(-1, keepdim=True)


CASES = [
    ("performer", {"features": M_FEATURES}, True),
    ("performer", {"features": M_FEATURES}, False),
    ("performer", {"features": M_FEATURES, "orthogonal": False, "seed": 4}, True),
    ("cosformer", {}, True),
    ("cosformer", {}, False),
    ("cosformer", {"max_len": 200}, True),
    ("based", {}, True),
    ("based", {}, False),
    ("hedgehog", {}, True),
    ("hedgehog", {"maps": "random"}, True),
    ("hedgehog", {"maps": "random"}, False),
]


def resolve(config):
    config = dict(config)
    if config.get("maps") == "random":
        config["maps"] = random_maps()
    return config


def random_state(name, config, b=2, h=2, dk=8, dv=6, seed=5):
    """A state as a call would return one, and the oracle's (S, z) for it."""
    gen = torch.Generator().manual_seed(seed)
    f = {"performer": config.get("features", 256), "cosformer": 2 * dk, "based": 1 + dk + dk * dk,
         "hedgehog": 2 * (config["maps"]["wk"].shape[-1] if config.get("maps") else dk)}[name]
    S = torch.randn(b, h, f, dv, generator=gen, dtype=torch.float64)
    z = torch.rand(b, h, f, generator=gen, dtype=torch.float64) * 5 + 1
    if name == "performer":
        offset = torch.randn(b, h, generator=gen, dtype=torch.float64)
        e = offset.exp()
        return PerformerState(S=S, z=z, offset=offset), S * e[..., None, None], z * e[..., None]
    if name == "cosformer":
        return CosformerState(S[..., :dk, :], S[..., dk:, :], z[..., :dk], z[..., dk:], seen=11), S, z
    return LinearState(S=S, z=z), S, z


def oracle(name, config, q, k, v, causal, state=None, s0=None, z0=None):
    """(out, S, z) of linear_recurrence on the method's features, float64."""
    dk = q.shape[-1]
    eps = config.get("eps", {"performer": 0.0, "cosformer": 1e-6, "based": 1e-12, "hedgehog": 1e-12}[name])
    if name == "performer":
        m, seed = config.get("features", 256), config.get("seed", 0)
        if config.get("orthogonal", True):
            fq, fk = performer_phi(q, dk**-0.5, m, seed), performer_phi(k, dk**-0.5, m, seed)
        else:
            w = torch.randn(m, dk, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            phi = lambda x: torch.exp(x * dk**-0.25 @ w.t() - (x * x).sum(-1, keepdim=True) * dk**-0.5 / 2) / m**0.5
            fq, fk = phi(q), phi(k)
    elif name == "cosformer":
        first = 1 + (state.seen if state is not None else 0)
        big_m = config.get("max_len") or q.shape[2]
        fq, fk = cosformer_phi(q, first, big_m), cosformer_phi(k, first, big_m)
    elif name == "based":
        fq, fk = taylor_phi(q, dk**-0.5), taylor_phi(k, dk**-0.5)
    else:
        maps = config.get("maps") or hedgehog.identity_maps(q.shape[1], k.shape[1], dk, torch.float64)
        fq = hedgehog_phi(q, maps["wq"].double(), maps["bq"].double())
        fk = hedgehog_phi(k, maps["wk"].double(), maps["bk"].double())
    return linear_recurrence(fq, fk, v, causal=causal, scale=1.0, initial_state=s0, initial_z=z0, normalize=True,
                             eps=eps, feature_map="identity")


def true_state(name, state):
    """The returned state as the oracle's (S, z)."""
    if name == "performer":
        e = state.offset.exp()
        return state.S * e[..., None, None], state.z * e[..., None]
    if name == "cosformer":
        return torch.cat([state.S_cos, state.S_sin], dim=-2), torch.cat([state.z_cos, state.z_sin], dim=-1)
    return state.S, state.z


@pytest.mark.parametrize("with_state", [False, True], ids=["s0-none", "s0-given"])
@pytest.mark.parametrize("n,chunk", [(37, 16), (130, 48)], ids=["N37-C16", "N130-C48"])
@pytest.mark.parametrize("name,config,causal", CASES,
                         ids=[f"{n}-{'-'.join(f'{key}={val}' for key, val in c.items()) or 'default'}-"
                              f"{'causal' if ca else 'noncausal'}" for n, c, ca in CASES])
def test_every_form_equals_the_recurrence(name, config, causal, n, chunk, with_state):
    config = resolve(config)
    if with_state and name == "cosformer" and not config.get("max_len"):
        config["max_len"] = 11 + n + 3  # a state needs a fixed M
    q, k, v = make(n=n, seed=n + chunk)
    inputs, state, s0, z0 = {}, None, None, None
    if with_state:
        state, s0, z0 = random_state(name, config)
        inputs["initial_state"] = state
    expected, S, z = oracle(name, config, q, k, v, causal, state, s0, z0)
    for form in FORMS:
        out, new = ak.attention(q, k, v, method=name, causal=causal, form=form, chunk_size=chunk, return_state=True,
                                **config, **inputs)
        assert out.shape == expected.shape and out.dtype == torch.float64
        assert _max_err(out, expected) < TOL, f"{form}: out off by {_max_err(out, expected):.2e}"
        S_got, z_got = true_state(name, new)
        assert _max_err(S_got, S) < TOL and _max_err(z_got, z) < TOL, f"{form}: state"
        assert type(new) is type(state or new)


SPLIT = [("performer", {"features": M_FEATURES}), ("cosformer", {"max_len": 128}), ("based", {}),
         ("hedgehog", {"maps": "random"})]


@pytest.mark.parametrize("name,config", SPLIT, ids=[s[0] for s in SPLIT])
def test_split_sequence_with_state_equals_one_shot(name, config):
    config = resolve(config)
    q, k, v = make(n=101, seed=9)
    if name == "performer":  # a later chunk with larger keys moves the stabiliser: the state rescales
        k = k * torch.linspace(0.5, 2.0, 101, dtype=torch.float64)[:, None]
    whole, final = ak.attention(q, k, v, method=name, causal=True, return_state=True, chunk_size=32, **config)
    cut = 45
    out1, state = ak.attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], method=name, causal=True,
                               return_state=True, chunk_size=32, **config)
    out2, state2 = ak.attention(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], method=name, causal=True,
                                initial_state=state, return_state=True, chunk_size=32, **config)
    assert _max_err(torch.cat([out1, out2], dim=2), whole) < TOL
    for a, b in zip(true_state(name, state2), true_state(name, final)):
        assert _max_err(a, b) < TOL


@pytest.mark.parametrize("name,config", SPLIT, ids=[s[0] for s in SPLIT])
def test_decode_token_by_token(name, config):
    config = resolve(config)
    q, k, v = make(n=24, seed=2)
    whole = ak.attention(q, k, v, method=name, causal=True, **config)
    _, state = ak.attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], method=name, causal=True, return_state=True,
                            **config)
    for t in range(20, 24):
        s = slice(t, t + 1)
        out, state, stats = ak.attention(q[:, :, s], k[:, :, s], v[:, :, s], method=name, causal=True,
                                         initial_state=state, return_state=True, return_stats=True, **config)
        assert stats.backend == "recurrent" and _max_err(out, whole[:, :, s]) < TOL
        state = state.detach()


@pytest.mark.parametrize("name,config", SPLIT, ids=[s[0] for s in SPLIT])
def test_float32_inputs_keep_a_float32_state(name, config):
    config = resolve(config)
    q, k, v = make(b=1, n=50, seed=6)
    expected = ak.attention(q, k, v, method=name, causal=True, **config)
    out, state = ak.attention(q.float(), k.float(), v.float(), method=name, causal=True, return_state=True, **config)
    assert out.dtype == torch.float32 and true_state(name, state)[0].dtype == torch.float32
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("name,config,causal", [("performer", {"features": 6}, True), ("performer", {"features": 6}, False),
                                                ("cosformer", {"max_len": 20}, True), ("based", {}, True),
                                                ("based", {}, False), ("hedgehog", {"maps": "small"}, True)])
def test_chunk_gradcheck(name, config, causal):
    config = dict(config)
    if config.get("maps") == "small":
        config["maps"] = random_maps(hq=2, h=1, d=3, m=2)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 10, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 10, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    fn = lambda q, k, v: ak.attention(q, k, v, method=name, causal=causal, form="chunk", chunk_size=4, **config)
    assert gradcheck(fn, (q, k, v), atol=1e-8)


# --- method-specific checks -------------------------------------------------------------


def test_performer_projection_is_block_orthogonal_and_seeded():
    w = projection(20, 8, seed=0)
    assert torch.equal(w, projection(20, 8, seed=0)) and not torch.equal(w, projection(20, 8, seed=1))
    for block in (w[:8], w[8:16]):  # rows orthogonal within a block, norms resampled (not all equal)
        gram = block @ block.t()
        assert (gram - torch.diag(gram.diagonal())).abs().max() < 1e-10
        assert gram.diagonal().std() > 0.1


def test_performer_approaches_softmax_as_features_grow():
    """FAVOR+ is an unbiased estimator of the softmax kernel: the error vs exact attention
    falls with m (averaged over seeds: a loose statistical check)."""
    q, k, v = make(b=1, hq=2, h=2, n=64, dk=16, dv=8, seed=7)
    q, k = q * 0.5, k * 0.5
    exact = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    errors = []
    for m in (16, 128, 1024):
        e = [((ak.attention(q, k, v, method="performer", features=m, seed=s) - exact).norm() / exact.norm()).item()
             for s in range(3)]
        errors.append(sum(e) / len(e))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.1, errors


def test_performer_is_stable_for_large_logits():
    """Log-features down to about -500: exp without the max shift underflows in float32
    (0 / 0 rows), and one max over the whole sequence would underflow the early queries;
    with the running max every row is finite and equals the float64 result."""
    q, k, v = make(b=1, n=64, dk=16, seed=8)
    q, k = q * 10, k * 10
    fq, fk = (performer_phi(x.float(), 0.25, 32).float() for x in (q, k))
    naive = linear_recurrence(fq, fk, v.float(), normalize=True, eps=0.0)[0]
    assert not torch.isfinite(naive).all()  # the unshifted float32 features fail here
    expected = ak.attention(q, k, v, method="performer", causal=True, features=32)
    for form in FORMS:
        out = ak.attention(q.float(), k.float(), v.float(), method="performer", causal=True, features=32, form=form,
                           chunk_size=16)
        assert torch.isfinite(out).all() and ((out.double() - expected).norm() / expected.norm()).item() < 1e-5, form


@pytest.mark.parametrize("causal", [True, False])
def test_cosformer_equals_its_dense_formula(causal):
    q, k, v = make(n=45, seed=4)
    out = ak.attention(q, k, v, method="cosformer", causal=causal)
    n, grp = 45, 2
    i = torch.arange(1, n + 1, dtype=torch.float64)
    w = torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / n)  # M = N
    a = (torch.relu(q) @ torch.relu(k).repeat_interleave(grp, 1).transpose(-1, -2)) * w
    if causal:
        a = a.tril()
    expected = (a @ v.repeat_interleave(grp, 1)) / (a.sum(-1, keepdim=True) + 1e-6)
    assert _max_err(out, expected) < TOL


def test_based_kernel_is_the_taylor_expansion_of_exp():
    from attnkit.methods.linear.based import taylor_features

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 16, generator=gen, dtype=torch.float64), torch.randn(5, 16, generator=gen, dtype=torch.float64)
    s = (x * y).sum(-1) / 4.0
    got = (taylor_features(x, 0.25) * taylor_features(y, 0.25)).sum(-1)
    assert torch.allclose(got, 1 + s + s * s / 2, atol=1e-12)


def _structured_qk(seed=0, n=48, d=8):
    """q, k near a few shared directions: spiky softmax rows, as in trained models."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, d, generator=gen) * 2.0
    pick = lambda: centers[torch.randint(0, 4, (1, 2, n), generator=gen)] + 0.3 * torch.randn(1, 2, n, d, generator=gen)
    return pick(), pick(), torch.randn(1, 2, n, d, generator=gen)


def test_hedgehog_distillation_mimics_softmax(tmp_path):
    q, k, v = _structured_qk()
    init = hedgehog.identity_maps(2, 2, 8)
    maps = hedgehog.distill(q, k, steps=150, lr=0.05)
    first, last = maps["loss"].tolist()
    assert last < 0.8 * first and hedgehog.mimicry_loss(q, k, maps).item() < hedgehog.mimicry_loss(q, k, init).item()
    exact = torch.softmax((q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~torch.ones(48, 48, dtype=torch.bool).tril(),
                                                                          -math.inf), -1) @ v
    err = lambda out: ((out - exact).norm() / exact.norm()).item()
    before = err(ak.attention(q, k, v, method="hedgehog", causal=True))
    after = err(ak.attention(q, k, v, method="hedgehog", causal=True, maps=maps))
    assert after < 0.8 * before, (before, after)
    path = str(tmp_path / "maps.pt")
    hedgehog.save_maps(path, {0: maps, 3: init})
    from_file = ak.attention(q, k, v, method="hedgehog", causal=True, maps=path, layer=0)
    assert torch.allclose(from_file, ak.attention(q, k, v, method="hedgehog", causal=True, maps=maps), atol=1e-6)


# --- registry and errors ------------------------------------------------------------------


def test_registered_with_info():
    from typer.testing import CliRunner

    from attnkit.cli import app

    names = {i.name for i in ak.methods(family="linear")}
    assert {"performer", "cosformer", "based", "hedgehog"} <= names
    for name, arxiv in (("performer", "2009.14794"), ("cosformer", "2202.08791"), ("based", "2402.18668"),
                        ("hedgehog", "2402.04347")):
        shown = CliRunner().invoke(app, ["info", name])
        assert shown.exit_code == 0 and arxiv in shown.output and "per-call inputs: initial_state" in shown.output


def _qkv():
    return make(b=1, hq=2, h=2, n=10, dk=4, dv=4, dtype=torch.float32)


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: ak.attention(q, k, v, method="performer", features=0), ValueError, r"features of method 'performer'"),
    (lambda q, k, v: ak.attention(q, k, v, method="performer", seed=-1), ValueError, r"seed of method 'performer'"),
    (lambda q, k, v: ak.attention(q, k, v, method="performer", causal=True,
                                  initial_state=LinearState(torch.zeros(1, 2, 256, 4), torch.zeros(1, 2, 256))),
     TypeError, r"must be a PerformerState"),
    (lambda q, k, v: ak.attention(q, k, v, method="performer", causal=True, features=8,
                                  initial_state=PerformerState(torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8), None)),
     TypeError, r"initial_state.offset must be a torch.Tensor"),
    (lambda q, k, v: ak.attention(q, k, v, method="cosformer", max_len=-1), ValueError, r"max_len of method 'cosformer'"),
    (lambda q, k, v: ak.attention(q, k, v, method="cosformer", causal=True, initial_state=CosformerState(
        *(torch.zeros(1, 2, 4, 4),) * 2, *(torch.zeros(1, 2, 4),) * 2, seen=3)), ValueError, r"set max_len"),
    (lambda q, k, v: ak.attention(q, k, v, method="cosformer", causal=True, max_len=8), ValueError,
     r"positions up to 10 exceed max_len=8"),
    (lambda q, k, v: ak.attention(q, k, v, method="based", eps=-1.0), ValueError, r"eps of method 'based'"),
    (lambda q, k, v: ak.attention(q, k, v, method="hedgehog", maps=3), TypeError, r"config field 'maps' of method 'hedgehog'"),
    (lambda q, k, v: ak.attention(q, k, v, method="hedgehog", maps={"wq": torch.zeros(2, 4, 3)}), ValueError,
     r"maps of method 'hedgehog': need wq \(Hq, D, M\), bq"),
    (lambda q, k, v: ak.attention(q, k, v, method="hedgehog", maps="/nonexistent/maps.pt"), ValueError,
     r"does not exist"),
    (lambda q, k, v: ak.attention(q, k, v, method="hedgehog", maps=random_maps(hq=4, h=2, d=4)), ValueError,
     r"the maps are for 4 query / 2 key heads of dim 4, the inputs have 2 / 2"),
    (lambda q, k, v: hedgehog.distill(q, k, steps=0), ValueError, r"steps must be an integer >= 1"),
], ids=["features", "seed", "state-class", "state-offset", "max_len", "cos-state-no-max_len", "cos-beyond-max_len",
        "eps", "maps-type", "maps-keys", "maps-file", "maps-heads", "distill-steps"])
def test_bad_configs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(*_qkv())


def _saved(name: str, n: int, config: dict) -> tuple[int, int]:
    """(largest, total) elements autograd saves for backward of the chunked form."""
    q, k, v = (t.float().requires_grad_() for t in make(b=1, hq=1, h=1, n=n, dk=16, dv=16, seed=1))
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out = ak.attention(q, k, v, method=name, causal=True, **config)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    return max(sizes), sum(sizes)


@pytest.mark.parametrize("name,config", [("performer", {"features": 64}), ("cosformer", {})])
def test_chunk_backward_saves_nothing_quadratic(name, config):
    """Saved for backward: O(N F) (F the feature count), linear in N — no N x N tensor,
    also through Performer's running-max decay."""
    largest, total = _saved(name, 1024, config)
    largest2, total2 = _saved(name, 2048, config)
    assert largest2 <= 2 * 2048 * (64 + 1), f"largest saved tensor at N=2048: {largest2} elements"
    assert total2 < 2.2 * total, f"saved {total} elements at N=1024, {total2} at N=2048: not linear in N"
