"""Method-specific properties of neighborhood, power and block_local_global (BigBird).

The shared checks (every registered static pattern against the oracle) live in
test_static_sparse.py; here: grids, window shifts, distance sets, random-table
properties, block-mask supersets and config errors, with masks from tests/rules.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import attnkit as ak
from attnkit.kernels.pattern import cdiv
from attnkit.reference import reference_attention
from rules import RULES, _na_axis_window, neighborhood, power

NAMES = ("neighborhood", "power", "block_local_global")


def _inputs(b, hq, hkv, nq, nk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, nq, d, generator=g),
        torch.randn(b, hkv, nk, d, generator=g),
        torch.randn(b, hkv, nk, d, generator=g),
    )


def _lengths(config):
    grid = config.get("grid")
    if grid is not None:
        n = math.prod(grid)
        return [(n, n)]
    return [(1, 1), (50, 50), (77, 77), (20, 131)]


def _valid_geometry(name, config, nq, nk, causal):
    if name != "neighborhood" or config.get("grid") is not None or causal:
        return True
    k, d = config.get("kernel_size", 7), config.get("dilation", 1)
    return nk // d >= k


def _causal_modes(name, config):
    grid = config.get("grid")
    return [False] if grid is not None and len(grid) == 2 else [False, True]


def _cases():
    for name in NAMES:
        for n, (config, rule) in enumerate(RULES[name]):
            for causal in _causal_modes(name, config):
                yield pytest.param(name, config, rule, causal, id=f"{name}-{n}-{'causal' if causal else 'full'}")


def _reference_causal(name, config, causal):
    """3D causal neighborhood is frame-causal (its rule holds causality), not token-causal."""
    grid = config.get("grid")
    return causal and not (name == "neighborhood" and grid is not None)


def _tiles(mask, bq, bk):
    nq, nk = mask.shape
    padded = torch.nn.functional.pad(mask, (0, cdiv(nk, bk) * bk - nk, 0, cdiv(nq, bq) * bq - nq))
    return padded.view(cdiv(nq, bq), bq, cdiv(nk, bk), bk).any(3).any(1)


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("name,config,rule,causal", list(_cases()))
def test_gather_matches_reference(name, config, rule, causal):
    for nq, nk in _lengths(config):
        if not _valid_geometry(name, config, nq, nk, causal):
            with pytest.raises(ValueError, match="too short"):
                ak.attention(*_inputs(1, 2, 2, nq, nk, 8), method=name, causal=causal, backend="gather", **config)
            continue
        q, k, v = _inputs(2, 4, 2, nq, nk, 16, seed=nq + nk)
        mask = rule(config, nq, nk, causal)
        expected = reference_attention(q, k, v, mask=mask, causal=_reference_causal(name, config, causal))
        for backend in ("gather", "dense"):
            out = ak.attention(q, k, v, method=name, causal=causal, backend=backend, **config)
            err = (out.double() - expected).abs().max().item()
            assert err < 1e-4, f"{backend} Nq={nq} Nk={nk}: max abs error {err}"


@pytest.mark.parametrize("name,config,rule,causal", list(_cases()))
def test_block_mask_is_a_tight_superset(name, config, rule, causal):
    m = ak.get(name, **config)
    sizes = _lengths(config) + ([] if config.get("grid") else [(64, 64), (65, 200), (190, 190), (1, 257)])
    for nq, nk in sizes:
        if not _valid_geometry(name, config, nq, nk, causal):
            continue
        mask = rule(config, nq, nk, causal)
        if _reference_causal(name, config, causal):
            mask = mask & torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
        bq, bk = m.block_size()
        true_tiles = _tiles(mask, bq, bk)
        listed = m.block_mask(nq, nk, causal, torch.device("cpu"))
        assert not (true_tiles & ~listed).any(), f"block mask misses tiles at Nq={nq} Nk={nk}"
        assert torch.equal(listed, true_tiles), f"block mask lists empty tiles at Nq={nq} Nk={nk}"
        assert torch.equal(m.pattern(nq, nk, causal, "cpu").dense_mask()[0, 0], mask)


@pytest.mark.parametrize("name", NAMES)
def test_rule_runs_under_vmap_in_flex_attention(name):
    """FlexAttention calls mask_mod with scalar tensors under vmap (eager mode here)."""
    from attnkit.kernels.flex import flex_attention

    config, rule = RULES[name][-1] if name != "neighborhood" else RULES[name][4]
    n = math.prod(config["grid"]) if config.get("grid") else 70
    causal = False
    q, k, v = _inputs(1, 2, 2, n, n, 16)
    pattern = ak.get(name, **config).pattern(n, n, causal, q.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, pattern, scale=0.25, compiled=False)
    expected = reference_attention(q, k, v, mask=rule(config, n, n, causal), scale=0.25)
    assert (out.double() - expected).abs().max().item() < 1e-4


# --------------------------------------------------------------------------- neighborhood


@pytest.mark.parametrize(
    "config",
    [
        {"kernel_size": 5},
        {"kernel_size": 4, "dilation": 3},
        {"kernel_size": 3, "grid": (5, 7)},
        {"kernel_size": (3, 5), "dilation": (2, 1), "grid": (7, 6)},
        {"kernel_size": (2, 3, 3), "dilation": (1, 2, 1), "grid": (4, 6, 5)},
    ],
)
def test_neighborhood_every_query_sees_exactly_the_kernel(config):
    n = math.prod(config["grid"]) if config.get("grid") else 41
    mask = ak.get("neighborhood", **config).pattern(n, n, False, "cpu").dense_mask()[0, 0]
    ndim = len(config.get("grid") or (n,))
    ks = config["kernel_size"]
    expected = math.prod((ks,) * ndim if isinstance(ks, int) else ks)
    assert (mask.sum(-1) == expected).all()


def test_neighborhood_windows_shift_inward_at_borders():
    mask = ak.get("neighborhood", kernel_size=5).pattern(12, 12, False, "cpu").dense_mask()[0, 0]
    keys = [torch.nonzero(row).flatten().tolist() for row in mask]
    assert keys[0] == keys[1] == keys[2] == [0, 1, 2, 3, 4]
    assert keys[5] == [3, 4, 5, 6, 7]
    assert keys[11] == keys[10] == keys[9] == [7, 8, 9, 10, 11]
    # Dilation 2 on 9 tokens: group {1, 3, 5, 7} has 4 members, query 7 keeps 3 of them.
    mask = ak.get("neighborhood", kernel_size=3, dilation=2).pattern(9, 9, False, "cpu").dense_mask()[0, 0]
    assert torch.nonzero(mask[7]).flatten().tolist() == [3, 5, 7]
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 2, 4]
    assert torch.nonzero(mask[8]).flatten().tolist() == [4, 6, 8]
    # Even kernel (GNA): K // 2 before the query, K // 2 - 1 after it.
    mask = ak.get("neighborhood", kernel_size=4).pattern(10, 10, False, "cpu").dense_mask()[0, 0]
    assert torch.nonzero(mask[5]).flatten().tolist() == [3, 4, 5, 6]


def test_neighborhood_causal_window_ends_at_query_and_never_shifts_forward():
    mask = ak.get("neighborhood", kernel_size=3, dilation=2).pattern(10, 10, True, "cpu").dense_mask()[0, 0]
    assert torch.nonzero(mask[0]).flatten().tolist() == [0]
    assert torch.nonzero(mask[3]).flatten().tolist() == [1, 3]
    assert torch.nonzero(mask[8]).flatten().tolist() == [4, 6, 8]
    # Nq < Nk: the queries are the last positions of the sequence.
    tail = ak.get("neighborhood", kernel_size=3, dilation=2).pattern(4, 10, True, "cpu").dense_mask()[0, 0]
    assert torch.equal(tail, mask[6:])


def test_neighborhood_3d_causal_is_causal_along_time_only():
    grid = (3, 4, 4)
    mask = ak.get("neighborhood", kernel_size=(2, 3, 3), grid=grid).pattern(48, 48, True, "cpu").dense_mask()[0, 0]
    t = torch.arange(48) // 16
    assert not (mask & (t[None, :] > t[:, None])).any()  # never a later frame
    assert (mask & (torch.arange(48)[None, :] > torch.arange(48)[:, None])).any()  # later tokens of the frame
    assert (mask[:16].sum(-1) == 9).all() and (mask[16:].sum(-1) == 18).all()


def test_neighborhood_causal_axes_accept_short_lengths():
    """A causal window only looks back, so a causal axis shorter than the kernel is fine."""
    q, k, v = _inputs(1, 2, 1, 2, 2, 8)
    out = ak.attention(q, k, v, method="neighborhood", causal=True, kernel_size=7, backend="gather")
    assert (out.double() - reference_attention(q, k, v, causal=True)).abs().max().item() < 1e-5
    grid = (2, 5, 5)
    config = {"kernel_size": 3, "grid": grid}
    q, k, v = _inputs(1, 2, 1, 50, 50, 8)
    out = ak.attention(q, k, v, method="neighborhood", causal=True, backend="gather", **config)
    expected = reference_attention(q, k, v, mask=neighborhood(config, 50, 50, True))
    assert (out.double() - expected).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="grid axis 0 .*too short"):
        ak.attention(q, k, v, method="neighborhood", causal=False, **config)


def test_neighborhood_geometry_errors():
    with pytest.raises(ValueError, match="2D grid"):
        ak.attention(*_inputs(1, 1, 1, 20, 20, 8), method="neighborhood", causal=True, kernel_size=3, grid=(4, 5))
    with pytest.raises(ValueError, match=r"Nq == Nk == 20"):
        ak.attention(*_inputs(1, 1, 1, 21, 21, 8), method="neighborhood", kernel_size=3, grid=(4, 5))
    with pytest.raises(ValueError, match="grid axis 1 .*kernel_size=5 with dilation=2"):
        ak.get("neighborhood", kernel_size=5, dilation=2, grid=(12, 9))
    with pytest.raises(ValueError, match="sequence length Nk is too short"):
        ak.attention(*_inputs(1, 1, 1, 6, 6, 8), method="neighborhood", kernel_size=7)
    with pytest.raises(ValueError, match="Nq <= Nk"):
        ak.attention(*_inputs(1, 1, 1, 12, 10, 8), method="neighborhood", kernel_size=3)
    with pytest.raises(ValueError, match="kernel_size .* tuple of 2 ints"):
        ak.get("neighborhood", kernel_size=(3, 3, 3), grid=(5, 5))
    with pytest.raises(ValueError, match="dilation .* integers >= 1"):
        ak.get("neighborhood", dilation=0)
    with pytest.raises(ValueError, match=r"grid .* \(H, W\) or \(T, H, W\)"):
        ak.get("neighborhood", grid=(2, 2, 2, 2))


def test_neighborhood_rule_helper_is_natten_formula():
    """The independent window (explicit group list) agrees with NATTEN's closed form."""
    for length in range(6, 30):
        for k in (2, 3, 5):
            for d in (1, 2, 3):
                if length // d < k:
                    continue
                for x in range(length):
                    r, p = x % d, x // d
                    group_len = (length - r + d - 1) // d
                    start = min(max(p - k // 2, 0), group_len - k)
                    assert _na_axis_window(x, length, k, d, False) == {(start + m) * d + r for m in range(k)}


# --------------------------------------------------------------------------- power


def test_power_token_level_distance_set():
    n = 300
    mask = ak.get("power", block=1, window_blocks=3, sink_blocks=0).pattern(n, n, True, "cpu").dense_mask()[0, 0]
    for i in (0, 1, 7, 100, 299):
        dists = {i - j for j in torch.nonzero(mask[i]).flatten().tolist()}
        expected = {d for d in range(3) if d <= i} | {2**k for k in range(10) if 2**k <= i}
        assert dists == expected
    assert mask.sum(-1).max().item() <= 3 + math.ceil(math.log2(n))


def test_power_noncausal_mirrors_and_sinks():
    n = 90
    m = ak.get("power", block=1, window_blocks=2, sink_blocks=0)
    full = m.pattern(n, n, False, "cpu").dense_mask()[0, 0]
    causal = m.pattern(n, n, True, "cpu").dense_mask()[0, 0]
    assert torch.equal(full, full.T) and torch.equal(full.tril(), causal)
    sinks = ak.get("power", block=1, window_blocks=1, sink_blocks=3).pattern(n, n, True, "cpu").dense_mask()[0, 0]
    assert sinks[3:, :3].all()


def test_power_block_granularity_matches_paper_kernel_defaults():
    m = ak.get("power")
    assert (m.config.block, m.config.window_blocks, m.config.sink_blocks) == (256, 5, 1)
    n = 32 * 1024
    mask = m.block_mask(n, n, True, torch.device("cpu"))
    per_block = 256 // m.block_size()[1]
    # Last query block (block 127 of 256 tokens): sink + 5 window blocks + distances 8, 16, 32, 64.
    assert mask[-1].sum().item() == 10 * per_block
    small = power({}, 600, 600, True) & torch.ones(600, 600, dtype=torch.bool).tril()
    assert torch.equal(m.block_mask(600, 600, True, torch.device("cpu")), _tiles(small, *m.block_size()))


def test_power_config_errors():
    with pytest.raises(ValueError, match="sink_blocks of method 'power' must be an integer >= 0"):
        ak.get("power", sink_blocks=-1)
    with pytest.raises(ValueError, match="window_blocks of method 'power' must be an integer >= 1"):
        ak.get("power", window_blocks=0)
    with pytest.raises(ValueError, match="block of method 'power'"):
        ak.get("power", block=0)


# --------------------------------------------------------------------------- BigBird


def _bigbird(**config):
    return ak.get("block_local_global", **config)


def test_bigbird_seed_determinism():
    a, b = _bigbird(block=8, random_blocks=2, seed=5), _bigbird(block=8, random_blocks=2, seed=5)
    other = _bigbird(block=8, random_blocks=2, seed=6)
    for causal in (False, True):
        assert torch.equal(a.random_table(400, causal), b.random_table(400, causal))
        assert not torch.equal(a.random_table(400, causal), other.random_table(400, causal))
        pa = a.pattern(400, 400, causal, "cpu").dense_mask()[0, 0]
        assert torch.equal(pa, b.pattern(400, 400, causal, "cpu").dense_mask()[0, 0])


def test_bigbird_random_blocks_are_outside_window_and_globals():
    block, w, g, r = 8, 3, 16, 3
    m = _bigbird(block=block, window_blocks=w, global_tokens=g, random_blocks=r, seed=2)
    nb = 60
    for causal in (False, True):
        table = m.random_table(nb * block, causal)
        for qb in range(nb):
            picks = torch.nonzero(table[qb]).flatten().tolist()
            if causal:
                cand = [kb for kb in range(g // block, qb - w + 1)]
            else:
                cand = [kb for kb in range(g // block, nb) if abs(kb - qb) > (w - 1) // 2]
            assert set(picks) <= set(cand)
            assert len(picks) == min(r, len(cand))
    # The causal table never looks ahead: it is a prefix of a longer sequence's table.
    short, long = m.random_table(20 * block, True), m.random_table(60 * block, True)
    assert torch.equal(short, long[:20, :20])


def test_bigbird_density_as_configured():
    block, w, g, r = 16, 3, 32, 2
    n = 64 * block
    m = _bigbird(block=block, window_blocks=w, global_tokens=g, random_blocks=r)
    mask = m.pattern(n, n, False, "cpu").dense_mask()[0, 0]
    counts = mask.sum(-1)
    # A query block away from the globals sees G global + w window + r random blocks.
    assert (counts[10 * block : 50 * block] == g + (w + r) * block).all()
    assert (counts[:g] == n).all()  # global queries see everything
    assert mask[:, :g].all()  # and every query sees the global tokens
    density = mask.float().mean().item()
    expected = ((g + (w + r) * block) * (n - g) + g * n) / (n * n)
    assert abs(density - expected) < 0.02


def test_bigbird_same_pattern_for_all_heads():
    pattern = _bigbird(block=8, global_tokens=4, random_blocks=2).pattern(100, 100, False, "cpu")
    assert pattern.kv_blocks.shape[:2] == (1, 1)
    assert pattern.block_q == pattern.block_k == 8


def test_bigbird_config_errors():
    with pytest.raises(ValueError, match="window_blocks of method 'block_local_global' must be odd"):
        _bigbird(window_blocks=2)
    with pytest.raises(ValueError, match="random_blocks of method 'block_local_global' must be an integer >= 0"):
        _bigbird(random_blocks=-1)
    with pytest.raises(ValueError, match="global_tokens .* >= 0"):
        _bigbird(global_tokens=-3)
    with pytest.raises(ValueError, match="block of method 'block_local_global'"):
        _bigbird(block=0)
    with pytest.raises(ValueError, match="Nq <= Nk"):
        ak.attention(*_inputs(1, 1, 1, 70, 60, 8), method="block_local_global", block=8)


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_paper_and_summary(name):
    info = ak.method_info(name)
    assert info.family == "static_sparse" and info.arxiv and info.summary
    assert {"causal", "non_causal", "gqa"} <= set(info.supports)
