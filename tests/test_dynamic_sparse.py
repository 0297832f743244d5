"""Dynamic sparse methods (block_topk, moba, hip, routing, sea, pbs, biformer; hyper in
test_hyper.py): the kernel is exact given each method's own returned pattern, a
budget that covers everything gives exact attention, and each estimator finds what it
promises on planted inputs."""

from __future__ import annotations

import math

import pytest
import torch
from planted import planted_clusters

import attnkit as ak
from attnkit.methods.sparse_dynamic import (  # noqa: F401  (register)
    biformer,
    block_topk,
    hip,
    moba,
    pbs,
    routing,
    sea,
)
from attnkit.reference import reference_attention

# name, small-budget config (N ~ 100-260, block 16), id
SMALL = [
    ("block_topk", {"block_size": 16, "topk": 2}, "pooled"),
    ("block_topk", {"block_size": 16, "pooling": "max", "threshold": 0.5}, "maxpool-threshold"),
    ("block_topk", {"block_size": 16, "scoring": "antidiagonal", "stride": 4, "topk": 2}, "antidiagonal"),
    ("moba", {"block_size": 16, "topk": 2}, "moba"),
    ("moba", {"block_size": 16, "topk": 2, "granularity": "token"}, "moba-token"),
    ("hip", {"block_size": 16, "topk": 2}, "hip"),
    ("sea", {"block_size": 16, "topk": 16, "chunk": 4}, "sea"),
    ("routing", {"block_size": 16, "clusters": 4, "sink": 0, "local": 0}, "routing-paper"),
    ("routing", {"block_size": 16, "clusters": 5, "sink": 0, "local": 0, "membership": "nearest"}, "routing-nearest"),
    ("routing", {"block_size": 16, "clusters": 4, "sink": 5, "local": 19}, "routing-anchored"),
    ("pbs", {"block_size": 16, "segment_size": 32, "threshold": 0.5}, "pbs"),
]
# configs whose budget covers every key
EVERYTHING = [
    ("block_topk", {"block_size": 16, "topk": 1000}),
    ("block_topk", {"block_size": 16, "scoring": "antidiagonal", "stride": 4, "topk": 1000}),
    ("moba", {"block_size": 16, "topk": 1000}),
    ("moba", {"block_size": 16, "topk": 1000, "granularity": "token"}),
    ("hip", {"block_size": 16, "topk": 1000}),
    ("sea", {"block_size": 16, "topk": 1000}),
    ("routing", {"block_size": 16, "clusters": 1}),
    ("pbs", {"block_size": 16, "segment_size": 512}),
]
BIFORMER = {"grid": (9, 15), "regions": (3, 5), "topk": 3}  # N = 135, 15 regions of 9 tokens


def _inputs(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g)
    k = torch.randn(b, hkv, nk, d, generator=g)
    v = torch.randn(b, hkv, nk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check_own_pattern(name, config, q, k, v, causal, backend="gather", tol=1e-4):
    out, stats = ak.attention(q, k, v, method=name, causal=causal, backend=backend, return_stats=True, **config)
    assert out.shape == q.shape and out.dtype == q.dtype
    mask = stats.pattern.dense_mask(q.shape[0], q.shape[1])
    expected = reference_attention(q, k, v, mask=mask, causal=causal)
    if q.dtype == torch.float32:
        assert (out.double() - expected).abs().max().item() < tol
    else:
        rel = (out.double() - expected).norm() / expected.norm()
        assert rel.item() < 2e-2
    allowed = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2]) if causal else mask
    total = q.shape[0] * q.shape[1] * (q.shape[2] * (q.shape[2] + 1) // 2 + q.shape[2] * (k.shape[2] - q.shape[2]) if causal else q.shape[2] * k.shape[2])
    assert stats.density == pytest.approx(allowed.sum().item() / total)
    assert stats.estimator_seconds > 0
    return stats


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 77, 77), (1, 2, 2, 130, 130), (2, 4, 2, 257, 257), (1, 4, 2, 33, 150)], ids=["B2-gqa-N77", "N130", "B2-gqa-N257", "Nq33-Nk150"])
@pytest.mark.parametrize("name,config", [pytest.param(n, c, id=i) for n, c, i in SMALL])
def test_exact_given_own_pattern_fp32(name, config, shape, causal):
    b, hq, hkv, nq, nk = shape
    q, k, v = _inputs(b, hq, hkv, nq, nk, 16)
    _check_own_pattern(name, config, q, k, v, causal)


@pytest.mark.parametrize("name,config", [pytest.param(n, c, id=i) for n, c, i in SMALL])
def test_exact_given_own_pattern_bf16_and_dense_backend(name, config):
    q, k, v = _inputs(2, 4, 2, 130, 130, 32, torch.bfloat16, seed=1)
    _check_own_pattern(name, config, q, k, v, causal=True)
    q, k, v = _inputs(2, 4, 2, 130, 130, 32, seed=2)
    _check_own_pattern(name, config, q, k, v, causal=False, backend="dense")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("name,config", EVERYTHING, ids=[f"{n}-{i}" for i, (n, _) in enumerate(EVERYTHING)])
def test_budget_covering_everything_is_exact(name, config, causal):
    q, k, v = _inputs(2, 4, 2, 130, 130, 16, seed=3)
    out, stats = ak.attention(q, k, v, method=name, causal=causal, return_stats=True, **config)
    expected = reference_attention(q, k, v, causal=causal)
    assert (out.double() - expected).abs().max().item() < 1e-4
    assert stats.density == pytest.approx(1.0)


def test_biformer_exact_given_pattern_and_full_routing():
    q, k, v = _inputs(2, 4, 2, 135, 135, 16, seed=4)
    stats = _check_own_pattern("biformer", BIFORMER, q, k, v, causal=False)
    # every query of a region sees exactly topk whole regions
    assert stats.density == pytest.approx(3 / 15)
    out = ak.attention(q, k, v, method="biformer", **{**BIFORMER, "topk": 15})
    assert (out.double() - reference_attention(q, k, v)).abs().max().item() < 1e-4
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    _check_own_pattern("biformer", BIFORMER, qb, kb, vb, causal=False)


def test_biformer_refuses_bad_geometry():
    q, k, v = _inputs(1, 2, 2, 130, 130, 8)
    with pytest.raises(ValueError, match="square"):
        ak.attention(q, k, v, method="biformer")
    with pytest.raises(ValueError, match="divisible"):
        ak.attention(q, k, v, method="biformer", grid=(10, 13), regions=(3, 3))
    with pytest.raises(ValueError, match="causal"):
        ak.attention(q, k, v, method="biformer", causal=True, grid=(10, 13), regions=(2, 1))


@pytest.mark.parametrize(
    "name,config",
    [
        ("block_topk", {"topk": 0}),
        ("block_topk", {"threshold": 1.5}),
        ("block_topk", {"scoring": "antidiagonal", "block_size": 64, "stride": 5}),
        ("block_topk", {"pooling": "median"}),
        ("moba", {"block_size": 0}),
        ("moba", {"granularity": "row"}),
        ("hip", {"topk": -1}),
        ("hip", {"chunk": 4, "topk": 30}),
        ("sea", {"features": 0}),
        ("sea", {"chunk": 8, "topk": 30}),
        ("sea", {"layer": -1}),
        ("sea", {"estimator": "/nonexistent/sea.pt"}),
        ("routing", {"clusters": -2}),
        ("routing", {"membership": "top"}),
        ("pbs", {"segment_size": 100, "block_size": 64}),
        ("biformer", {"regions": (0, 3)}),
    ],
)
def test_config_errors_are_clear(name, config):
    with pytest.raises(ValueError, match=list(config)[-1]):
        ak.get(name, **config)


# --- estimator properties on planted inputs -------------------------------------------------


def _planted(n=512, d=32, q_block=(448, 512), k_block=(128, 192), strength=4.0, seed=5):
    """Random q, k with queries in ``q_block`` and keys in ``k_block`` sharing one direction."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, n, d, generator=g) * 0.3
    k = torch.randn(1, 2, n, d, generator=g) * 0.3
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * strength
    q[:, :, q_block[0] : q_block[1]] += u
    k[:, :, k_block[0] : k_block[1]] += u
    v = torch.randn(1, 2, n, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(
    "name,config",
    [
        ("block_topk", {"topk": 1}),
        ("block_topk", {"pooling": "max", "topk": 1}),
        ("block_topk", {"scoring": "antidiagonal", "topk": 1}),
        ("block_topk", {"threshold": 0.5}),
        ("moba", {"block_size": 64, "topk": 2}),
        ("moba", {"block_size": 64, "topk": 2, "granularity": "token"}),
        ("hip", {"topk": 128, "local": 0}),
        ("sea", {"topk": 128, "sink": 0, "local": 0}),
        ("pbs", {"segment_size": 128, "threshold": 0.5}),
    ],
)
def test_dominant_key_block_is_always_selected(name, config, causal):
    q, k, v = _planted()
    _, stats = ak.attention(q, k, v, method=name, causal=causal, return_stats=True, **config)
    mask = stats.pattern.dense_mask(1, 2)
    assert bool(mask[:, :, 448:512, 128:192].all()), f"{name} missed the planted key block"
    assert stats.density < 0.8  # and it is still sparse


def test_hip_follows_a_smooth_bump_down_the_tree():
    """HiP's premise (attention locality): scores vary smoothly along the keys; the tree
    search must end at the keys around the peak (position 700), for every query."""
    n, d = 2048, 32
    g = torch.Generator().manual_seed(6)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    pos = torch.arange(n, dtype=torch.float32)
    bump = 5.0 * torch.exp(-(((pos - 700.0) / 300.0) ** 2))
    k = (torch.randn(1, 1, n, d, generator=g) * 0.1 + bump[:, None] * u).contiguous()
    q = (torch.randn(1, 1, n, d, generator=g) * 0.1 + u).contiguous()
    v = torch.randn(1, 1, n, d, generator=g)
    _, stats = ak.attention(q, k, v, method="hip", topk=64, sink=0, local=0, causal=False, return_stats=True)
    mask = stats.pattern.dense_mask()[0, 0].clone()
    mask[torch.arange(n), torch.arange(n)] = False  # local=0 still keeps each query's own key
    kept = mask.nonzero()[:, 1]
    assert int(mask.sum(1).max()) <= 64  # topk keys per query block, no more
    assert 600 <= int(kept.min()) and int(kept.max()) <= 800
    assert mask[:, 650:750].sum(1).float().mean() > 48  # most of them within 50 of the peak


def test_hip_keeps_topk_keys_per_block_from_chunks_of_chunk_keys():
    """The tree ends with topk / chunk chunks of at most ``chunk`` keys: each query block
    attends to at most ``topk`` keys beside its sink and band, all before its first query."""
    n, bs, topk, sink, local = 700, 32, 48, 8, 40
    q, k, v = _inputs(1, 4, 2, n, n, 16, seed=12)
    _, stats = ak.attention(q, k, v, method="hip", block_size=bs, topk=topk, chunk=4, sink=sink, local=local,
                            causal=True, return_stats=True)
    mask = stats.pattern.dense_mask(1, 4)[0]
    qp, kp = torch.arange(n)[:, None], torch.arange(n)[None, :]
    content = mask & ~((kp < sink) | ((qp - kp >= 0) & (qp - kp < local)))
    for b0 in range(0, n, bs):
        rows = content[:, b0 : b0 + bs]
        per_block = rows.any(1)  # (H, Nk): the block's tree keys (a row's sink and band excluded)
        assert int(per_block.sum(-1).max()) <= topk
        assert not bool(per_block[:, b0:].any())  # causal: all before the block
        outside = max(b0 - local + 1, 0)  # keys outside every band of the block
        assert bool((rows[..., :outside] == per_block[:, None, :outside]).all())  # one key set per block
        if b0 + bs - local - sink > 2 * topk:  # many more candidates than topk: the budget is used
            assert int(per_block.sum(-1).min()) >= topk // 2
    assert torch.equal(content[0::2], content[1::2])  # shared by the query heads of a KV head


@pytest.mark.parametrize("name", ["hip", "sea"])
@pytest.mark.parametrize("n", [1, 40, 64, 65], ids=["N1", "N40", "N64", "N65"])
def test_key_slot_methods_on_sequences_within_their_anchors(name, n):
    """Prompts no longer than sink + band (a short chat turn): every key is an anchor, so
    the result is exact attention (no candidates, no chunks to pick)."""
    q, k, v = _inputs(2, 4, 2, n, n, 16, seed=14)
    out = ak.attention(q, k, v, method=name, causal=True)
    expected = reference_attention(q, k, v, causal=True)
    assert (out.double() - expected).abs().max().item() < 1e-4


def test_routing_clusters_contain_planted_matching_pairs():
    """Four well-separated directions: queries and keys of one direction share a cluster and
    attend only to each other (plus key 0, the sink)."""
    n = 256
    q, k, v, label_q, label_k = planted_clusters(n)
    _, stats = ak.attention(q, k, v, method="routing", clusters=4, sink=0, local=0, membership="nearest", causal=False,
                            return_stats=True)
    expected = label_q[:, None] == label_k[None, :]
    expected[:, 0] = True
    assert torch.equal(stats.pattern.dense_mask()[0, 0], expected)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_routing_balanced_clusters_take_each_centroids_nearest_keys(causal):
    """Balanced membership (the paper's code): each centroid takes its N / C nearest keys.
    Keys in 4 equal groups of 64 around 4 directions, queries around the same directions
    but shifted by a common offset (as a pretrained model's q and k sit apart): every
    query still gets exactly the keys of its direction, plus key 0."""
    n, d = 256, 32
    g = torch.Generator().manual_seed(7)
    dirs = torch.nn.functional.normalize(torch.randn(4, d, generator=g), dim=1) * 5
    label_k = torch.arange(n)[torch.randperm(n, generator=g)] % 4
    label_q = torch.randint(0, 4, (n,), generator=g)
    shift = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * 2
    q = (dirs[label_q] + shift + 0.1 * torch.randn(n, d, generator=g)).view(1, 1, n, d)
    k = (dirs[label_k] + 0.1 * torch.randn(n, d, generator=g)).view(1, 1, n, d)
    v = torch.randn(1, 1, n, d, generator=g)
    out, stats = ak.attention(q, k, v, method="routing", clusters=4, sink=0, local=0, causal=causal, block_size=16,
                              return_stats=True)
    expected = label_q[:, None] == label_k[None, :]
    expected[:, 0] = True
    if causal:
        expected &= torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(stats.pattern.dense_mask()[0, 0], expected)
    ref = reference_attention(q.double(), k.double(), v.double(), mask=expected)
    assert (out.double() - ref).abs().max() < 1e-4


def test_moba_gates_each_token_like_the_paper():
    """Independent per-token MoBA: top-k blocks by q . mean(k_block) among past blocks, own
    block forced, causal inside."""
    n, d, mb, topk = 150, 8, 16, 3
    q, k, v = _inputs(1, 2, 1, n, n, d, seed=8)
    _, stats = ak.attention(q, k, v, method="moba", block_size=mb, topk=topk, granularity="token", sink=0, causal=True,
                            return_stats=True)
    mask = stats.pattern.dense_mask(1, 2)
    for h in range(2):
        for t in range(n):
            own = t // mb
            scores = {j: float(q[0, h, t] @ k[0, 0, j * mb : (j + 1) * mb].mean(0)) for j in range(own)}
            chosen = {own} | set(sorted(scores, key=scores.get, reverse=True)[: topk - 1])
            expected = torch.tensor([j // mb in chosen and j <= t for j in range(n)])
            assert torch.equal(mask[0, h, t], expected), (h, t)


def test_moba_default_density_scales_as_topk_blocks():
    q, k, v = _inputs(1, 1, 1, 4096, 4096, 16, seed=9)
    _, stats = ak.attention(q, k, v, method="moba", causal=True, return_stats=True)
    # 12 blocks of 128 per token (fewer for the first tokens) + 64 sink keys: density
    # ~ (12*128 + 64) / (N/2) = 0.78 at 4k.
    assert 0.5 < stats.density < 0.8


def test_pbs_permutes_only_within_segments():
    q, k, _ = _inputs(1, 2, 2, 300, 300, 16, seed=10)
    m = ak.get("pbs", block_size=16, segment_size=64)
    _, perm = m.estimate_permuted(q, k, True, 0.25)
    seg = torch.arange(300) // 64
    assert torch.equal(seg[perm.k], seg.expand_as(perm.k))
    assert torch.equal(perm.k.sort(-1).values, torch.arange(300).expand_as(perm.k))


# --- memory ------------------------------------------------------------------------------

MEMORY = [
    ("block_topk", {}),
    ("block_topk", {"scoring": "antidiagonal"}),
    ("moba", {}),
    ("hip", {}),
    ("sea", {}),
    ("routing", {}),
    ("pbs", {"threshold": 0.5}),  # random inputs give flat block scores: 0.9 keeps ~all
    ("biformer", {"regions": (8, 8)}),  # 128 x 128 grid
]


@pytest.mark.parametrize("name,config", MEMORY, ids=[f"{n}-{i}" for i, (n, _) in enumerate(MEMORY)])
def test_peak_memory_at_16k_is_far_below_n_squared(name, config):
    from attnkit.bench.speed import PeakMemory

    n = 16384
    q, k, v = _inputs(1, 2, 1, n, n, 32, seed=11)
    causal = "causal" in ak.method_info(name).supports
    with PeakMemory() as mem:
        out = ak.attention(q, k, v, method=name, causal=causal, **config)
    assert torch.isfinite(out).all()
    n_by_n = n * n * 4
    assert mem.grown < n_by_n / 4, f"{name} grew {mem.grown / 2**20:.0f} MiB (N x N fp32 = {n_by_n / 2**20:.0f} MiB)"


def test_math_of_defaults():
    assert ak.method_info("moba").config == {"block_size": 128, "topk": 12, "granularity": "block", "sink": 64, "local": 0}
    assert ak.get("routing").num_clusters(16384) == round(math.sqrt(16384))


def _causal_prefill_methods() -> list[str]:
    return [m.name for m in ak.methods() if m.family in ("exact", "static_sparse", "dynamic_sparse")
            and "causal" in m.supports and "prefill" in m.kinds]


@pytest.mark.parametrize("name", _causal_prefill_methods())
def test_non_contiguous_inputs_give_the_contiguous_result(name):
    """transformers hands attention q/k/v as transposed views (B, N, H, D) -> (B, H, N, D);
    every prefill method must accept them and give the same output."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 130, 4, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 130, 2, 16, generator=g).transpose(1, 2)
    v = torch.randn(2, 130, 2, 16, generator=g).transpose(1, 2)
    assert not q.is_contiguous()
    config = {"head_patterns": [{"pattern": "vertical_slash", "vertical_size": 8, "slash_size": 4}] * 4} \
        if name == "minference" else {}  # minference needs a plan
    got = ak.attention(q, k, v, method=name, causal=True, **config)
    want = ak.attention(q.contiguous(), k.contiguous(), v.contiguous(), method=name, causal=True, **config)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dv", [8, 24], ids=["Dv8", "Dv24"])
@pytest.mark.parametrize("name", _causal_prefill_methods())
def test_value_head_size_may_differ_from_the_query_head_size(name, dv):
    """Each output column depends only on its value column (selection uses q and k only), so
    out(v) with Dv != D must match runs on D-column slices / zero-padded copies of v."""
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 4, 130, 16, generator=g), torch.randn(2, 2, 130, 16, generator=g)
    v = torch.randn(2, 2, 130, dv, generator=g)
    config = {"head_patterns": [{"pattern": "vertical_slash", "vertical_size": 8, "slash_size": 4}] * 4} \
        if name == "minference" else {}  # minference needs a plan
    got = ak.attention(q, k, v, method=name, causal=True, **config)
    assert got.shape == (2, 4, 130, dv)
    if dv < 16:
        want = ak.attention(q, k, torch.nn.functional.pad(v, (0, 16 - dv)), method=name, causal=True, **config)[..., :dv]
        torch.testing.assert_close(got, want)
    else:
        for cols in (slice(0, 16), slice(dv - 16, dv)):
            want = ak.attention(q, k, v[..., cols].contiguous(), method=name, causal=True, **config)
            torch.testing.assert_close(got[..., cols], want)
