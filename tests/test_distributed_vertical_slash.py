"""``vertical_slash`` across shards (``attnkit.distributed.vertical_slash_ring``) on 2 and 4
gloo processes: the index is the single-process estimate and the output and gradients
equal the single-process ``ak.attention(method="vertical_slash")`` within 1e-5 (fp32),
zigzag and contiguous, a length the ranks do not divide, GQA, batch 2.
"""

from __future__ import annotations

import pytest
import torch
from spawn_helpers import serve_checks, spawn_checks

import attnkit as ak
from attnkit import distributed as akd
from attnkit.methods.sparse_dynamic.minference_patterns import estimate_vertical_slash

TOL = 1e-5
# sparse at these lengths: 8 columns (2 sinks), 4 diagonals (3 local), 64-row blocks
CONFIG = {"vertical_size": 8, "slash_size": 4, "last_q": 16, "sink": 2, "local": 3}
CASES = {"zigzag-n130": ("zigzag", 130), "contiguous-n130": ("contiguous", 130), "zigzag-n203": ("zigzag", 203)}
CHECKS = list(CASES)


def _run_check(name, rank, world):
    layout, n = CASES[name]
    gen = torch.Generator().manual_seed(n + len(layout))
    q, k, v = (torch.randn(2, h, n, 16, generator=gen) for h in (4, 2, 2))
    grad = torch.randn(2, 4, n, 16, generator=gen)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ak.attention(*full, method="vertical_slash", causal=True, **CONFIG)
    (ref * grad).sum().backward()
    shards = [akd.shard(t, layout=layout).requires_grad_() for t in (q, k, v)]
    out, index = akd.vertical_slash_ring(*shards, layout=layout, total_len=n, return_index=True, **CONFIG)
    (out * akd.shard(grad, layout=layout)).sum().backward()
    want = estimate_vertical_slash(q, k, 16**-0.5, 8, 4, 16, 2, 3)
    for bb in range(2):
        for hh in range(4):
            assert torch.equal(index.verticals[bb][hh], want.verticals[bb][hh]), (bb, hh)
            assert torch.equal(index.slashes[bb][hh], want.slashes[bb][hh]), (bb, hh)
    errs = {"out": (akd.unshard(out.detach(), layout=layout, total_len=n) - ref).abs().max().item()}
    for name_, s, f in zip("qkv", shards, full):
        errs["d" + name_] = (akd.unshard(s.grad, layout=layout, total_len=n) - f.grad).abs().max().item()
    assert all(e < TOL for e in errs.values()), f"max errors {errs}"


def _worker(rank, world, port, path):
    serve_checks(rank, world, port, path, CHECKS, _run_check)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return {world: spawn_checks(_worker, world, tmp_path_factory.mktemp(f"vs-{world}")) for world in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("check", CHECKS)
def test_vertical_slash_ring_matches_one_process(results, world, check):
    for rank, res in enumerate(results[world]):
        assert res[check] == "ok", f"rank {rank} of {world}:\n{res[check]}"
