"""Sink + local-band anchors of the dynamic estimators (moba, hip, sea, hyper) and
FlexPrefill's reference-code vertical-slash blocks on query-aware heads.

The anchors are what StreamingLLM keeps (the first keys and a local window); on a
pretrained model they hold most of the attention mass (docs/performance.md). Checked
against brute-force geometry and against the float64 oracle on each method's pattern.
"""

from __future__ import annotations

import pytest
import torch
from planted import planted_clusters

import attnkit as ak
from attnkit.methods.sparse_dynamic import flexprefill, hip, hyper, moba, sea  # noqa: F401  (register)
from attnkit.methods.sparse_dynamic.common import anchor_block_mask, causal_block_mask
from attnkit.reference import causal_mask, reference_attention


def _inputs(b, hq, hkv, nq, nk, d, seed=0, scale_qk=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g) * scale_qk
    k = torch.randn(b, hkv, nk, d, generator=g) * scale_qk
    v = torch.randn(b, hkv, nk, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("nq,nk,bq,bk,sink,local", [(77, 77, 16, 16, 5, 20), (50, 130, 16, 8, 0, 33), (130, 130, 32, 16, 40, 0), (64, 64, 16, 16, 0, 0)])
def test_anchor_tiles_are_the_tiles_of_the_sink_and_band_pairs(nq, nk, bq, bk, sink, local):
    off = nk - nq
    qp = torch.arange(nq)[:, None] + off
    kp = torch.arange(nk)[None, :]
    pairs = ((kp < sink) | (qp - kp < local)) & (kp <= qp)
    expected = torch.nn.functional.pad(pairs, (0, -nk % bk, 0, -nq % bq))
    expected = expected.view(-(-nq // bq), bq, -(-nk // bk), bk).any(3).any(1)
    got = anchor_block_mask(nq, nk, bq, bk, sink, local)
    # Within causal tiles, a tile is an anchor tile iff it holds a causal sink or band pair.
    assert torch.equal(got & causal_block_mask(nq, nk, bq, bk), expected)


ANCHORED = [
    pytest.param("moba", {"block_size": 32, "topk": 1, "sink": 4, "local": 24}, id="moba"),
    pytest.param("moba", {"block_size": 32, "topk": 1, "sink": 4, "local": 24, "granularity": "token"}, id="moba-token"),
    pytest.param("hip", {"block_size": 16, "topk": 16, "sink": 20, "local": 40}, id="hip"),
    pytest.param("sea", {"block_size": 16, "topk": 16, "chunk": 4, "sink": 20, "local": 40}, id="sea"),
]


@pytest.mark.parametrize("shape", [(2, 4, 2, 257, 257), (1, 2, 1, 61, 190)], ids=["B2-gqa-N257", "Nq61-Nk190"])
@pytest.mark.parametrize("name,config", ANCHORED)
def test_anchored_pattern_keeps_sink_and_band_and_is_exact(name, config, shape):
    b, hq, hkv, nq, nk = shape
    q, k, v = _inputs(b, hq, hkv, nq, nk, 16, seed=3)
    out, stats = ak.attention(q, k, v, method=name, causal=True, return_stats=True, **config)
    mask = stats.pattern.dense_mask(b, hq)
    expected = reference_attention(q, k, v, mask=mask, causal=True)
    assert (out.double() - expected).abs().max().item() < 1e-4
    qp = torch.arange(nq)[:, None] + (nk - nq)
    kp = torch.arange(nk)[None, :]
    anchors = ((kp < config["sink"]) | (qp - kp < config["local"])) & (kp <= qp)
    assert bool((mask | ~anchors).all()), f"{name} dropped a sink or local-band pair"
    assert stats.density < 0.9


@pytest.mark.parametrize("name,config", [("moba", {"block_size": 32, "topk": 1}), ("hip", {"block_size": 16, "topk": 2}), ("sea", {"block_size": 16, "topk": 8, "chunk": 4})])
def test_anchors_only_add_pairs(name, config):
    q, k, v = _inputs(1, 2, 2, 200, 200, 16, seed=4)
    plain = ak.attention(q, k, v, method=name, causal=True, return_stats=True, **config, sink=0, local=0)[1]
    anchored = ak.attention(q, k, v, method=name, causal=True, return_stats=True, **config, sink=16, local=48)[1]
    assert anchored.density > plain.density


def test_hyper_sink_keys_are_attended_exactly():
    """One key with a huge score (an attention sink) breaks uniform sampling unless it is
    attended exactly; with ``sink`` covering it the error collapses."""
    n, d = 512, 16
    q, k, v = _inputs(1, 1, 1, n, n, d, seed=6, scale_qk=0.5)
    q[0, 0] += 2.0
    k[0, 0, 0] = 4.0  # key 0 dominates every row
    expected = reference_attention(q, k, v, causal=True)

    def err(sink):
        out = ak.attention(q, k, v, method="hyper", causal=True, block_size=32, sample_size=16, min_seq_len=64, sink=sink, local=0)
        return ((out.double() - expected).norm() / expected.norm()).item()

    assert err(1) < err(0) / 3


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_hyper_exact_when_sink_and_band_cover_every_key(causal):
    q, k, v = _inputs(2, 4, 2, 257, 257, 16, seed=7)
    out, stats = ak.attention(q, k, v, method="hyper", causal=causal, return_stats=True, block_size=32, sample_size=8,
                              min_seq_len=64, sink=1000, local=0)
    expected = reference_attention(q, k, v, causal=causal)
    assert (out.double() - expected).abs().max().item() < 1e-4
    assert stats.density == pytest.approx(1.0)


def test_hyper_band_at_each_split_is_exact():
    """local >= the split size: every off-diagonal quarter is attended exactly."""
    q, k, v = _inputs(1, 2, 2, 256, 256, 16, seed=8)
    out = ak.attention(q, k, v, method="hyper", causal=True, block_size=16, sample_size=4, min_seq_len=32, sink=0, local=1000)
    expected = reference_attention(q, k, v, causal=True)
    assert (out.double() - expected).abs().max().item() < 1e-4


def test_flexprefill_query_aware_heads_get_the_reference_vertical_slash_blocks():
    """tau=1 makes every head query-aware; with qa_vertical_slash (the reference code) each
    head's top min_budget vertical blocks — from the last block of queries' exact softmax,
    recomputed here in float64 — are attended by every query, and the pattern stays exact."""
    n, block = 256, 16
    q, k, v = _inputs(1, 2, 2, n, n, 16, seed=9)
    common = {"block": block, "min_budget": 48, "max_budget": 64, "tau": 1.0, "gamma": 0.3}
    _, plain = ak.attention(q, k, v, method="flexprefill", causal=True, return_stats=True, qa_vertical_slash=False, **common)
    out, ref = ak.attention(q, k, v, method="flexprefill", causal=True, return_stats=True, **common)
    m_ref = ref.pattern.dense_mask(1, 2)
    assert ref.density > plain.density
    causal = causal_mask(n, n)
    scores = (q[0, :, -block:].double() @ k[0].double().transpose(-1, -2)) * 16**-0.5
    probs = torch.softmax(scores.masked_fill(~causal[-block:], float("-inf")), dim=-1)
    vertical = probs.mean(1).view(2, n // block, block).sum(-1)  # (H, nKB)
    vertical[:, 0] = float("inf")  # the first block is always one of them
    for h in range(2):
        for blk in vertical[h].topk(48 // block + 1).indices.tolist():
            cols = slice(blk * block, (blk + 1) * block)
            assert bool(m_ref[0, h][:, cols][causal[:, cols]].all()), (h, blk)
    expected = reference_attention(q, k, v, mask=m_ref, causal=True)
    assert (out.double() - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("name,field", [("moba", "sink"), ("hip", "local"), ("sea", "local"), ("hyper", "sink"), ("hyper", "local")])
def test_negative_anchor_sizes_are_refused(name, field):
    with pytest.raises(ValueError, match=f"{field} of method '{name}' must be an integer >= 0"):
        ak.get(name, **{field: -1})


# --- log-sum-exp merging and routing's anchors -------------------------------------------


def _random_pattern(nq, nk, block, density, seed, heads=2):
    from attnkit.methods.sparse_dynamic.common import block_pattern

    g = torch.Generator().manual_seed(seed)
    tiles = torch.rand(1, heads, -(-nq // block), -(-nk // block), generator=g) < density
    return block_pattern(tiles, block, block, nq, nk, causal=True)


@pytest.mark.parametrize("kernel", ["gather-one-pass", "gather-online-softmax", "ranges"])
def test_kernel_lse_is_the_oracle_logsumexp_and_empty_rows_are_zero(kernel):
    from attnkit.kernels import run
    from attnkit.kernels.block_sparse import gather_plan
    from attnkit.kernels.tiled import tiled_attention

    q, k, v = _inputs(2, 2, 1, 77, 77, 16, seed=20)
    pattern = _random_pattern(77, 77, 16, 0.4, seed=21, heads=1 if kernel == "ranges" else 2)
    if kernel == "ranges":
        out, lse, _ = run(pattern, q, k, v, 0.25, backend="ranges", return_lse=True)
    else:
        budget = 64 if kernel == "gather-online-softmax" else 1 << 22
        out, lse = tiled_attention(q, k, v, gather_plan(pattern, torch.float32, budget_elems=budget), 0.25)
    mask = pattern.dense_mask(2, 2)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    scores = scores.masked_fill(~mask, float("-inf"))
    expected_lse = torch.logsumexp(scores, dim=-1)
    empty = ~mask.any(-1)
    assert empty.any(), "the random pattern should leave some rows empty"
    assert torch.isinf(lse[empty]).all() and (lse[empty] < 0).all()
    assert (lse[~empty].double() - expected_lse[~empty]).abs().max() < 1e-4
    assert (out[empty] == 0).all()
    expected = reference_attention(q, k, v, mask=mask | empty.unsqueeze(-1))  # any key for empty rows
    assert (out[~empty].double() - expected[~empty]).abs().max() < 1e-4


def test_merging_disjoint_parts_is_attention_over_their_union():
    from attnkit.kernels import merge_partials, run
    from attnkit.kernels.pattern import BlockPattern

    q, k, v = _inputs(1, 4, 2, 130, 130, 16, seed=22)
    full = _random_pattern(130, 130, 16, 1.0, seed=0, heads=1)
    split = torch.Generator().manual_seed(23)
    coin = torch.rand(130, 130, generator=split) < 0.5

    def half(keep):
        rule = full.mask_mod
        return BlockPattern(kv_blocks=full.kv_blocks, block_q=16, block_k=16, q_len=130, kv_len=130,
                            mask_mod=lambda b, h, qp, kp: rule(b, h, qp, kp) & (coin[qp.clamp(0, 129), kp.clamp(0, 129)] == keep))

    parts = [run(half(flag), q, k, v, 0.25, backend="gather", return_lse=True)[:2] for flag in (True, False)]
    out, lse = merge_partials(parts)
    expected = reference_attention(q, k, v, causal=True, scale=0.25)
    assert (out.double() - expected).abs().max() < 1e-5
    scores = ((q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25).masked_fill(~causal_mask(130, 130), float("-inf"))
    assert (lse.double() - torch.logsumexp(scores, -1)).abs().max() < 1e-4


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_routing_with_anchors_is_clusters_or_sink_or_band(causal):
    """Planted clusters plus anchors: the pattern is exactly "same cluster, or one of the
    first `sink` keys, or within `local` of the query" (causal when asked), and the output
    is the oracle's on that set — each pair counted once although both parts hold some."""
    n, sink, local = 256, 3, 10
    q, k, v, label_q, label_k = planted_clusters(n)
    out, stats = ak.attention(q, k, v, method="routing", clusters=4, sink=sink, local=local, block_size=16,
                              membership="nearest", causal=causal, return_stats=True)
    qp, kp = torch.arange(n)[:, None], torch.arange(n)[None, :]
    band = (qp - kp < local) & ((qp >= kp) if causal else (kp - qp < local))
    expected = (label_q[:, None] == label_k[None, :]) | (kp < sink) | band
    if causal:
        expected &= kp <= qp
    assert torch.equal(stats.pattern.dense_mask()[0, 0], expected)
    assert stats.density == pytest.approx(expected.sum().item() / (n * (n + 1) // 2 if causal else n * n))
    ref = reference_attention(q.double(), k.double(), v.double(), mask=expected)
    assert (out.double() - ref).abs().max() < 1e-4
