"""Context parallel (issue #20): ring (zigzag / contiguous) and Ulysses attention on
2 and 4 gloo processes equal the single-process ``ak.attention`` within 1e-5 (fp32),
forward and backward, causal and not, lengths the ranks do not divide, GQA.

The workers are spawned once per world size (one process group each) and run every
check; each check's outcome per rank is written to a JSON file that the test functions
read, so a failing check names itself without hanging the others.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spawn_helpers import free_port, serve_checks, spawn_checks

import attnkit as ak
from attnkit import distributed as akd

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]

# (name, N, Hq, Hkv)
SHAPES = [("n37-h4-kv2", 37, 4, 2), ("n130-h9-kv3", 130, 9, 3), ("n37-h4-kv1", 37, 4, 1)]
STATIC = [("sliding_window", {"window": 20}), ("streaming", {"sink": 4, "window": 16})]


def _checks():
    out = []
    for shape, *_ in SHAPES:
        for causal in (True, False):
            for layout in ("zigzag", "contiguous"):
                out.append(f"ring-{layout}-{'causal' if causal else 'noncausal'}-{shape}")
            out.append(f"ulysses-{'causal' if causal else 'noncausal'}-{shape}")
    for name, _ in STATIC:
        for layout in ("zigzag", "contiguous"):
            out.append(f"ring-{name}-{layout}")
    out += ["ulysses-sliding_window", "ring-lse", "ring-tiny", "roundtrip", "length-mismatch", "compute-counters"]
    return out


CHECKS = _checks()


def _inputs(n, hq, hkv, seed, d=16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, n, d, generator=g) for h in (hq, hkv, hkv))
    return q, k, v, torch.randn(2, hq, n, d, generator=g)


def _compare(fn, layout, n, hq, hkv, causal, seed, method="full", **config):
    """fn(q, k, v, total_len) on shards vs ak.attention on the whole, out and grads."""
    q, k, v, g = _inputs(n, hq, hkv, seed)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ak.attention(*full, method=method, causal=causal, **config)
    (ref * g).sum().backward()
    shards = [akd.shard(t, layout=layout).requires_grad_() for t in (q, k, v)]
    out = fn(*shards, n)
    (out * akd.shard(g, layout=layout)).sum().backward()
    res = {"out": akd.unshard(out.detach(), layout=layout, total_len=n)}
    for name, s in zip("qkv", shards):
        res["d" + name] = akd.unshard(s.grad, layout=layout, total_len=n)
    refs = {"out": ref.detach(), "dq": full[0].grad, "dk": full[1].grad, "dv": full[2].grad}
    errs = {key: (res[key] - refs[key]).abs().max().item() for key in refs}
    assert all(e < TOL for e in errs.values()), f"max errors {errs}"
    return out


def _run_check(name, rank, world):
    if name == "roundtrip":
        x = torch.randn(2, 3, 37, 5, generator=torch.Generator().manual_seed(1))
        for layout in akd.LAYOUTS:
            s = akd.shard(x, layout=layout)
            assert s.shape[2] == akd.padded_len(37, world, layout) // world
            idx = akd.positions(rank, world, 37, layout)
            assert torch.equal(s[:, :, idx < 37], x[:, :, idx[idx < 37]])
            assert torch.equal(akd.unshard(s, layout=layout, total_len=37), x)
        return
    if name == "ulysses-sliding_window":  # any method runs locally over the whole sequence
        _compare(lambda q, k, v, t: akd.ulysses_attention(q, k, v, method="sliding_window", window=20, total_len=t),
                 "contiguous", 130, 9, 3, True, 11, "sliding_window", window=20)
        return
    if name == "ring-tiny":  # 3 positions: whole shards of padding, rows without a key
        for layout in akd.LAYOUTS:
            for method, config in (("full", {}), ("sliding_window", {"window": 1})):
                _compare(lambda q, k, v, t: akd.ring_attention(q, k, v, method=method, layout=layout, total_len=t,
                                                               **config), layout, 3, 2, 1, True, 7, method, **config)
        return
    if name == "ring-lse":  # the merged lse is the single-process one
        q, k, v, _ = _inputs(130, 4, 2, 5)
        _, ref = ak.attention(q, k, v, causal=True, return_lse=True)
        for layout in akd.LAYOUTS:
            out, lse = akd.ring_attention(*(akd.shard(t, layout=layout) for t in (q, k, v)), layout=layout,
                                          total_len=130, return_lse=True)
            err = (akd.unshard(lse, layout=layout, total_len=130) - ref).abs().max().item()
            assert err < TOL, f"{layout}: lse off by {err:.2e}"
        return
    if name == "compute-counters":  # per-rank score entries vs positions (and bytes vs shapes)
        _check_counters(rank, world)
        return
    if name == "length-mismatch":
        x = torch.zeros(1, 1, 40 + (rank == world - 1), 4)
        with pytest.raises(ValueError, match="different total lengths"):
            akd.shard(x)
        return
    parts = name.split("-")
    seed = sum(map(ord, name))
    if parts[1] in dict(STATIC):
        method, config, layout = parts[1], dict(STATIC)[parts[1]], parts[2]
        stats = {}

        def fn(q, k, v, total):
            out, st = akd.ring_attention(q, k, v, method=method, layout=layout, total_len=total, return_stats=True,
                                         **config)
            stats.update(st)
            return out

        _compare(fn, layout, 130, 4, 2, True, seed, method=method, **config)
        if method == "sliding_window" and layout == "contiguous" and world == 4:
            assert stats["transfers_skipped"] == 2 and stats["bytes_saved"] > 0, stats
        return
    shape = "-".join(parts[-3:])
    _, n, hq, hkv = next(s for s in SHAPES if s[0] == shape)
    if parts[0] == "ring":
        layout, causal = parts[1], parts[2] == "causal"
        _compare(lambda q, k, v, t: akd.ring_attention(q, k, v, causal=causal, layout=layout, total_len=t),
                 layout, n, hq, hkv, causal, seed)
    else:
        causal = parts[1] == "causal"
        _compare(lambda q, k, v, t: akd.ulysses_attention(q, k, v, causal=causal, total_len=t),
                 "contiguous", n, hq, hkv, causal, seed)


def _check_counters(rank, world):
    """Ring: each rank computes B*Hq*sum over its query positions p of the keys p sees
    (p + 1 under causal, capped at the true length for padded rows; N without causality);
    zigzag gives every rank the same share N(N+1)/(2R) when 2R divides N. Ulysses: its
    Hq'/R heads over the whole causal triangle; bytes (R-1)/R of q, k, v, out."""
    b, hq = 2, 4
    for n in (128, 37):
        q, k, v, _ = _inputs(n, hq, 2, 3)
        for layout in akd.LAYOUTS:
            pos = akd.positions(rank, world, n, layout)
            for causal in (True, False):
                want = b * hq * int((torch.clamp(pos + 1, max=n) if causal else torch.full_like(pos, n)).sum())
                _, st = akd.ring_attention(*(akd.shard(t, layout=layout) for t in (q, k, v)), causal=causal,
                                           layout=layout, total_len=n, return_stats=True)
                assert st["score_pairs"] == want, (n, layout, causal, st, want)
                if layout == "zigzag" and causal and n % (2 * world) == 0:
                    assert st["score_pairs"] == b * hq * n * (n + 1) // (2 * world)
        _, st = akd.ulysses_attention(*(akd.shard(t, layout="contiguous") for t in (q, k, v)), total_len=n,
                                      return_stats=True)
        local = akd.padded_len(n, world, "contiguous") // world
        hq_pad = -(-hq // world) * world
        heads = 2 * hq_pad + (2 * 2 if hq_pad == hq and 2 % world == 0 else 2 * hq_pad)  # q, out; k, v
        assert st["score_pairs"] == b * (hq_pad // world) * n * (n + 1) // 2, st
        assert st["bytes_sent"] == (world - 1) * b * heads * local * 16 * 4 // world, st


def _worker(rank, world, port, path):
    serve_checks(rank, world, port, path, CHECKS, _run_check)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return {world: spawn_checks(_worker, world, tmp_path_factory.mktemp(f"cp-{world}")) for world in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("check", CHECKS)
def test_context_parallel_matches_one_process(results, world, check):
    for rank, res in enumerate(results[world]):
        assert res[check] == "ok", f"rank {rank} of {world}:\n{res[check]}"


def _dying_worker(rank, world, port, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=10))
    if rank == 1:
        os._exit(0)  # dies without a word
    q = torch.randn(1, 2, 8, 4)
    start = time.monotonic()
    try:
        akd.ring_attention(q, q, q, causal=True)
        msg = "no error"
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
    Path(path).write_text(json.dumps({"error": msg, "seconds": time.monotonic() - start}))


def test_a_dead_rank_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "dead.json"
    mp.spawn(_dying_worker, args=(2, free_port(), str(path)), nprocs=2, join=True)
    res = json.loads(path.read_text())
    assert res["error"] != "no error" and res["seconds"] < 30, res


def test_torchrun_example_runs():
    """The docs' torchrun example (docs/distributed.md) at 2 ranks, small sizes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "context_parallel.py"), "--length", "67", "--time", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    errors = [float(line.split(": ")[1]) for line in res.stdout.splitlines() if "max error" in line]
    assert len(errors) == 2 and max(errors) < TOL, res.stdout
    timing = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][0])
    assert timing["ranks"] == 2 and all(timing[k] > 0 for k in ("ring_zigzag_s", "ulysses_s", "one_process_s"))
