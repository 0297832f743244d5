"""Selecting KV-cache policies (mode "select": tokenselect, recycled, retrieval, infllm,
quest) on small tensors: the full cache is kept and each decode step attends to a
selection, checked against a reference written here from the paper's rule and against
``reference_attention`` over the selected set."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kv_helpers import HKV, HQ, SCALE, B, D, G, N, _qkv, _step, check_output, topk_mask  # noqa: F401

from attnkit.kvcache import KVCache
from attnkit.reference import reference_attention


def _decode(cache, k, v, seed):
    q1, k1, v1 = _qkv(1, seed=seed)
    k, v = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
    return _step(cache, q1, k1, v1), q1, k, v


# --- tokenselect ------------------------------------------------------------------------


def ref_tokenselect(q1, k, budget, sink, recent):
    """Per KV head: softmax(q.k) of each query head, summed over the group; top-budget with
    the sinks and the recent tokens forced."""
    n = k.shape[2]
    logits = (q1[:, :, 0, None, :] * k.repeat_interleave(G, 1)).sum(-1) * SCALE  # (B, HQ, n)
    votes = logits.softmax(-1).view(B, HKV, G, n).sum(2)
    forced = torch.zeros(n, dtype=torch.bool)
    forced[:sink] = True
    forced[n - recent:] = True
    return topk_mask(votes.masked_fill(forced, float("inf")), budget)


def test_tokenselect_soft_vote_and_selection_cache():
    q, k, v = _qkv()
    budget, sink, recent = 12, 2, 3
    cache = KVCache("tokenselect", budget=budget, sink=sink, recent=recent, threshold=2.0)  # never reuse
    torch.testing.assert_close(_step(cache, q, k, v), reference_attention(q, k, v, causal=True, scale=SCALE))
    for s in range(3):
        out, q1, k, v = _decode(cache, k, v, 100 + s)
        sel = ref_tokenselect(q1, k, budget, sink, recent)
        assert bool((sel.sum(-1) == budget).all())
        check_output(out, q1, k, v, sel)
    assert cache.kept_positions(0).shape[-1] == N + 3  # full cache kept
    # selection cache: an identical direction of query reuses the last selection (+ the new token)
    cache = KVCache("tokenselect", budget=budget, sink=sink, recent=recent, threshold=0.9)
    q, k, v = _qkv()
    _step(cache, q, k, v)
    out, q1, k, v = _decode(cache, k, v, 110)
    first = ref_tokenselect(q1, k, budget, sink, recent)
    check_output(out, q1, k, v, first)
    _, k1, v1 = _qkv(1, seed=111)
    q2 = q1 * 1.5  # cosine 1 with the previous query
    k, v = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
    out = _step(cache, q2, k1, v1)
    reused = torch.cat([first, torch.ones(B, HKV, 1, dtype=torch.bool)], -1)
    check_output(out, q2, k, v, reused)
    assert cache.policy.reused == 1 and cache.policy.recomputed == 1
    # a dissimilar query recomputes
    out, q3, k, v = _decode(cache, k, v, 112)
    cos = F.cosine_similarity(q3[:, :, 0].reshape(B, HKV, -1), q1[:, :, 0].reshape(B, HKV, -1), dim=-1)
    assert bool((cos < 0.9).any())
    check_output(out, q3, k, v, ref_tokenselect(q3, k, budget, sink, recent))


# --- recycled ---------------------------------------------------------------------------


def test_recycled_full_every_stride_then_top_k():
    q, k, v = _qkv()
    budget, stride = 10, 3
    cache = KVCache("recycled", budget=budget, stride=stride)
    _step(cache, q, k, v)
    recycled = None
    for s in range(7):
        out, q1, k, v = _decode(cache, k, v, 200 + s)
        n = k.shape[2]
        if s % stride == 0:  # full step: exact, then the top-k of its attention (mean over the group)
            check_output(out, q1, k, v, torch.ones(B, HKV, n, dtype=torch.bool))
            logits = (q1[:, :, 0, None, :] * k.repeat_interleave(G, 1)).sum(-1) * SCALE
            probs = logits.softmax(-1).view(B, HKV, G, n).mean(2)
            recycled, full_n = topk_mask(probs, budget), n
        else:
            sel = torch.cat([recycled, torch.ones(B, HKV, n - full_n, dtype=torch.bool)], -1)
            check_output(out, q1, k, v, sel)
    assert cache.kept_positions(0).shape[-1] == N + 7


# --- retrieval --------------------------------------------------------------------------


def ref_retrieval(q1, k, budget, sink, recent):
    """Sinks + recent + the top inner products of the group-mean query among the rest."""
    n = k.shape[2]
    qm = q1[:, :, 0].view(B, HKV, G, D).mean(2)
    ip = (qm[:, :, None, :] * k).sum(-1)
    static = torch.zeros(n, dtype=torch.bool)
    static[:sink] = True
    static[n - recent:] = True
    got = topk_mask(ip.masked_fill(static, float("-inf")), budget - sink - recent)
    return got | static


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_retrieval_sinks_recent_and_top_inner_products(index):
    pytest.importorskip("faiss")
    q, k, v = _qkv()
    budget, sink, recent = 14, 2, 4
    cache = KVCache("retrieval", budget=budget, sink=sink, recent=recent, index=index, ef_search=64)
    _step(cache, q, k, v)
    for s in range(4):  # tokens leave the recent window into the index as decoding goes on
        out, q1, k, v = _decode(cache, k, v, 300 + s)
        sel = ref_retrieval(q1, k, budget, sink, recent)
        assert bool((sel.sum(-1) == budget).all())
        check_output(out, q1, k, v, sel)
    heads = cache.policy.indexes[0]
    assert heads[0][0].index.ntotal == N + 4 - sink - recent  # every non-static key is indexed
    assert cache.kept_positions(0).shape[-1] == N + 4


# --- infllm -----------------------------------------------------------------------------


def ref_infllm(q_prompt, q_steps, k, budget, sink, recent, size, r, window):
    """InfLLM's rule, looping: blocks of the prompt formed from the last `window` prompt
    queries; the last step's query retrieves blocks by summed q.k of the representatives."""
    n = k.shape[2]
    q1 = q_steps[-1]
    n_blocks = (n - sink - recent) // size
    # the observation window when each block is formed: prompt queries, then decode queries
    want = torch.zeros(B, HKV, n, dtype=torch.bool)
    for b in range(B):
        for h in range(HKV):
            reprs = []
            for j in range(n_blocks):
                start = sink + j * size
                formed_at = start + size + recent  # tokens seen when the block left the local window
                formed_at = max(formed_at, N + 1)  # prompt blocks form at the first decode step
                qs = torch.cat([q_prompt] + q_steps, 2)[b, h * G:(h + 1) * G, :formed_at - 1][:, -window:]
                qpos = torch.arange(formed_at - 1 - qs.shape[1], formed_at - 1)
                kk = k[b, h, :formed_at - 1]
                logits = qs @ kk.T * SCALE
                logits = logits.masked_fill(torch.arange(kk.shape[0])[None, None] > qpos[None, :, None],
                                            float("-inf"))
                score = logits.softmax(-1).mean(1).mean(0)  # mean over window queries and the group
                blk = score[start:start + size]
                reprs.append([start + int(i) for i in blk.topk(r).indices])
            rel = [sum(float((q1[b, h * G + g, 0] * k[b, h, t]).sum()) for g in range(G) for t in rep)
                   for rep in reprs]
            top = sorted(range(n_blocks), key=lambda j: -rel[j])[: (budget - sink - recent) // size]
            want[b, h, :sink] = True
            want[b, h, sink + n_blocks * size:] = True
            for j in top:
                want[b, h, sink + j * size: sink + (j + 1) * size] = True
    return want


def test_infllm_blocks_representatives_and_retrieval():
    q, k, v = _qkv()
    cfg = dict(block_size=5, repr_tokens=2, sink=2, recent=6, window=8)
    budget = 2 + 6 + 10  # two blocks
    cache = KVCache("infllm", budget=budget, **cfg)
    _step(cache, q, k, v)
    steps = []
    for s in range(6):  # a new block forms during decode
        out, q1, k, v = _decode(cache, k, v, 400 + s)
        steps.append(q1)
        sel = ref_infllm(q, steps, k, budget, cfg["sink"], cfg["recent"], cfg["block_size"], cfg["repr_tokens"],
                         cfg["window"])
        check_output(out, q1, k, v, sel)
    assert cache.kept_positions(0).shape[-1] == N + 6


# --- all four: budget >= length is exact; errors ---------------------------------------------


@pytest.mark.parametrize("policy", ["tokenselect", "recycled", "retrieval", "infllm"])
def test_large_budget_is_exact(policy):
    if policy == "retrieval":
        pytest.importorskip("faiss")
    q, k, v = _qkv()
    cache = KVCache(policy, budget=N + 10)
    torch.testing.assert_close(_step(cache, q, k, v), reference_attention(q, k, v, causal=True, scale=SCALE))
    for s in range(3):
        out, q1, k, v = _decode(cache, k, v, 500 + s)
        torch.testing.assert_close(out, reference_attention(q1, k, v, scale=SCALE))


def test_config_errors():
    with pytest.raises(ValueError, match="stride"):
        KVCache("recycled", budget=8, stride=0)
    with pytest.raises(ValueError, match="repr_tokens"):
        KVCache("infllm", budget=8, block_size=4, repr_tokens=5)
    with pytest.raises(ValueError, match="sink"):
        KVCache("tokenselect", budget=8, sink=-1)
    if pytest.importorskip("faiss"):
        with pytest.raises(ValueError, match="index"):
            KVCache("retrieval", budget=8, index="ivf")


# --- quest ----------------------------------------------------------------------------


def ref_quest_pages(q1, k, budget, page):
    """Per (b, kv head): the selected pages, from the rule (loops)."""
    n = k.shape[2]
    n_pages = math.ceil(n / page)
    want = torch.zeros(B, HKV, n, dtype=torch.bool)
    for b in range(B):
        for h in range(HKV):
            scores = []
            for p in range(n_pages):
                kp = k[b, h, p * page:(p + 1) * page]
                lo, hi = kp.min(0).values, kp.max(0).values
                s = sum(max(float(q1[b, h * G + j, 0, c] * lo[c]), float(q1[b, h * G + j, 0, c] * hi[c]))
                        for j in range(G) for c in range(D)) / G
                scores.append(s)
            scores[n_pages - 1] = float("inf")  # the newest page
            top = sorted(range(n_pages), key=lambda p: -scores[p])[: max(1, budget // page)]
            for p in top:
                want[b, h, p * page:(p + 1) * page] = True
    return want


def test_quest_selects_pages_by_bounds():
    q, k, v = _qkv()
    cache = KVCache("quest", budget=16, page_size=4, skip_layers=0)
    out = _step(cache, q, k, v)  # prefill: exact
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True, scale=SCALE))
    for s in range(3):
        q1, k1, v1 = _qkv(1, seed=40 + s)
        k, v = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
        out = _step(cache, q1, k1, v1)
        sel = ref_quest_pages(q1, k, 16, 4)
        assert bool((sel.sum(-1) <= 16).all())
        ref = reference_attention(q1, k, v, mask=sel.repeat_interleave(G, 1)[:, :, None], scale=SCALE)
        torch.testing.assert_close(out, ref)
    assert cache.kept_positions(0).shape[-1] == N + 3  # full cache kept


def test_quest_large_budget_and_skipped_layers_are_exact():
    q, k, v = _qkv()
    for kw in (dict(budget=64, page_size=4, skip_layers=0), dict(budget=8, page_size=4)):
        cache = KVCache("quest", **kw)
        _step(cache, q, k, v)
        q1, k1, v1 = _qkv(1, seed=50)
        out = _step(cache, q1, k1, v1)
        ref = reference_attention(q1, torch.cat([k, k1], 2), torch.cat([v, v1], 2), scale=SCALE)
        torch.testing.assert_close(out, ref)
