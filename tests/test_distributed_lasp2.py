"""LASP-2 (context-parallel linear attention, ``attnkit.distributed.lasp2``) on 2 and 4
gloo processes equals the single-process ``ak.attention`` within 1e-5 (fp32), forward
and gradients (q, k, v and the inputs g / beta; errors relative to max(1, the largest
reference value): unscaled methods such as ``lightning`` sum dozens of O(1) terms): every linear method with a state,
causal and (where supported) non-causal, a length the ranks do not divide, GQA (value
grouping for the delta rule), batch 2; a rank holding only padding; bf16 within one
bf16 rounding (1e-2); the refusals and errors (on every rank, never a hang).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from spawn_helpers import serve_checks, spawn_checks

import attnkit as ak
from attnkit import distributed as akd

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
B, N, D = 2, 37, 8
# method -> config (small feature maps: the test is about the sharding)
CAUSAL = {"linear": {}, "retnet": {}, "lightning": {}, "gla": {"chunk_size": 8}, "delta": {"chunk_size": 8},
          "gated_delta": {}, "kda": {"chunk_size": 8}, "performer": {"features": 16}, "cosformer": {},
          "based": {}, "hedgehog": {}}
NONCAUSAL = ["linear", "performer", "cosformer", "based", "hedgehog"]
DELTA = ("delta", "gated_delta", "kda")

CHECKS = ([f"causal-{m}" for m in CAUSAL] + [f"noncausal-{m}" for m in NONCAUSAL]
          + ["tiny-gla", "tiny-performer-noncausal", "tiny-cosformer", "linear-unnormalized",
             "zigzag-refused", "not-linear-refused", "length-mismatch", "missing-beta", "bf16-gla", "bf16-linear"])


def _inputs(method, n, seed):
    """q, k, v, the method's per-call inputs and an output gradient, full length."""
    gen = torch.Generator().manual_seed(seed)
    hq, hk, hv = (2, 2, 4) if method in DELTA else (4, 2, 2)
    q, k, v = (torch.randn(B, h, n, D, generator=gen) for h in (hq, hk, hv))
    inputs = {}
    if method == "gla":
        inputs["g"] = F.logsigmoid(torch.randn(B, hv, n, D, generator=gen)) / 4
    if method in ("gated_delta", "kda"):
        shape = (B, hv, n) if method == "gated_delta" else (B, hv, n, D)
        inputs["g"] = F.logsigmoid(torch.randn(*shape, generator=gen)) / 4
    if method in DELTA:
        inputs["beta"] = torch.sigmoid(torch.randn(B, hv, n, generator=gen))
    grad = torch.randn(B, max(hq, hv), n, D, generator=gen)
    return (q, k, v), inputs, grad


def _err(got, ref):
    got, ref = got.float(), ref.float()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def _compare(method, causal, n, seed, dtype=torch.float32, tol=TOL, **config):
    """lasp2 on contiguous shards vs ak.attention on the whole: out and every gradient."""
    qkv, inputs, grad = _inputs(method, n, seed)
    full = {**dict(zip("qkv", qkv)), **inputs}
    full = {name: t.to(dtype) for name, t in full.items()}
    grad = grad.to(dtype)
    full = {name: t.clone().requires_grad_() for name, t in full.items()}
    ref = ak.attention(full["q"], full["k"], full["v"], method=method, causal=causal,
                       **{x: full[x] for x in inputs}, **config)
    (ref * grad).sum().backward()
    shards = {name: akd.shard(t.detach(), layout="contiguous").requires_grad_() for name, t in full.items()}
    out = akd.lasp2(shards["q"], shards["k"], shards["v"], method=method, causal=causal, total_len=n,
                    **{x: shards[x] for x in inputs}, **config)
    (out * akd.shard(grad, layout="contiguous")).sum().backward()
    errs = {"out": _err(akd.unshard(out.detach(), layout="contiguous", total_len=n), ref.detach())}
    for name, s in shards.items():
        errs["d" + name] = _err(akd.unshard(s.grad, layout="contiguous", total_len=n), full[name].grad)
    assert all(e < tol for e in errs.values()), f"max errors {errs}"


def _refusals(name, rank, world):
    q = torch.randn(1, 2, 8, 4)
    if name == "zigzag-refused":
        with pytest.raises(ValueError, match="contiguous layout"):
            akd.lasp2(q, q, q, layout="zigzag")
    elif name == "not-linear-refused":
        with pytest.raises(ValueError, match="recurrent state"):
            akd.lasp2(q, q, q, method="sliding_window", window=4)
    elif name == "missing-beta":  # 5 positions: at 4 ranks the last shard is padding, it raises too
        qs = akd.shard(torch.randn(1, 2, 5, 4), layout="contiguous")
        with pytest.raises(ValueError, match="needs beta"):
            akd.lasp2(qs, qs, qs, method="delta", total_len=5)
    else:  # one rank called with another total length: an error on every rank, no hang
        with pytest.raises(ValueError, match="different total lengths"):
            akd.lasp2(q, q, q, total_len=8 * world - (rank == world - 1))


def _run_check(name, rank, world):
    seed = sum(map(ord, name))
    if name.endswith("-refused") or name in ("length-mismatch", "missing-beta"):
        _refusals(name, rank, world)
    elif name.startswith("bf16-"):  # within bf16 rounding of the single-process output
        method = name.split("-")[1]
        _compare(method, True, N, seed, dtype=torch.bfloat16, tol=1e-2, **CAUSAL[method])
    elif name.startswith("tiny-"):  # 5 positions: at 4 ranks the last holds only padding
        method = name.split("-")[1]
        _compare(method, not name.endswith("noncausal"), 5, seed, **CAUSAL[method])
    elif name == "linear-unnormalized":
        _compare("linear", True, N, seed, normalize=False)
    else:
        mode, method = name.split("-", 1)
        _compare(method, mode == "causal", N, seed, **CAUSAL[method])


def _worker(rank, world, port, path):
    serve_checks(rank, world, port, path, CHECKS, _run_check)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return {world: spawn_checks(_worker, world, tmp_path_factory.mktemp(f"lasp2-{world}")) for world in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("check", CHECKS)
def test_lasp2_matches_one_process(results, world, check):
    for rank, res in enumerate(results[world]):
        assert res[check] == "ok", f"rank {rank} of {world}:\n{res[check]}"


def test_lasp2_example_runs():
    """The docs' torchrun example (docs/distributed.md, LASP-2) at 2 ranks, small sizes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "lasp2.py"), "--length", "67"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    errors = [float(line.split("max error: ")[1].split()[0]) for line in res.stdout.splitlines() if "max error" in line]
    assert len(errors) == 3 and max(errors) < TOL, res.stdout
