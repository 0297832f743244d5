"""KVCache and its policies on small tensors: every policy against a reference written
here from the paper's rule, outputs against ``reference_attention`` over the kept set."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit.kvcache import KVCache
from attnkit.reference import reference_attention

from kv_helpers import B, D, G, HKV, HQ, N, SCALE, _qkv, _step  # noqa: F401
POLICIES = [m.name for m in ak.methods(kind="cache")]
# Policies that keep every token (quantize or prune it, or select per step, or keep it on
# retrieval heads): their kept-set and budget checks live in tests/test_kvcache_select.py,
# tests/test_kvcache_store.py and tests/test_kvcache_evict.py (duo).
FULL_CACHE = {"quantized", "quest", "duo", "tokenselect", "recycled", "retrieval", "infllm", "think", "zipcache"}
DROPPING = [p for p in POLICIES if p not in FULL_CACHE]
# Storage policies have no budget (passing one is an error); their settings that make the
# cache exact: KIVI with a full-precision window longer than the run, ThinK pruning no
# channel. ZipCache has none (it quantizes the prompt right after the prefill, even at
# 8 bits): its outputs are checked against a reference quantizer in test_kvcache_store.py.
EXACT_CONFIG = {"quantized": {"bits": 8, "residual": 32 * (N // 32 + 4)}, "think": {"pruning_ratio": 0.0}}
NO_EXACT_SETTING = {"zipcache"}






def _kept_mask(cache: KVCache, n: int, layer=0) -> torch.Tensor:
    """(B, Hkv, n) bool of the positions held."""
    pos = cache.kept_positions(layer)
    out = torch.zeros(pos.shape[0], pos.shape[1], n + 1, dtype=torch.bool)
    out.scatter_(-1, pos.clamp(min=-1) % (n + 1), pos >= 0)
    return out[..., :n]


def _assert_topk(ref_scores: torch.Tensor, kept: torch.Tensor, k: int, forced=None):
    """kept (B, Hkv, n) holds k slots per head and is a top-k of ref_scores (ties allowed)."""
    assert bool((kept.sum(-1) == k).all()), kept.sum(-1)
    s = ref_scores.clone()
    if forced is not None:
        s = s.masked_fill(forced, float("inf"))
    lo = s.masked_fill(~kept, float("inf")).min(-1).values
    hi = s.masked_fill(kept, float("-inf")).max(-1).values
    assert bool((lo >= hi - 1e-6).all()), (lo, hi)


# --- references written from the papers' rules --------------------------------------


def ref_window_probs(q, k, w):
    """(B, Hq, w, N) softmax of the last w queries over all keys, causal, float64."""
    n = k.shape[2]
    logits = q[:, :, -w:].double() @ k.repeat_interleave(G, 1).double().transpose(-1, -2) * SCALE
    qpos = torch.arange(n - w, n)[:, None]
    logits = logits.masked_fill(torch.arange(n)[None, :] > qpos, float("-inf"))
    return logits.softmax(-1)


def ref_snapkv(q, k, w, kernel, pooling):
    n = k.shape[2]
    p = ref_window_probs(q, k, w)[..., : n - w].mean(-2)  # (B, Hq, n - w)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    p = pool(p, kernel, stride=1, padding=kernel // 2)
    p = p.view(B, HKV, G, n - w).mean(2)
    return F.pad(p, (0, w), value=float("inf"))


def ref_h2o_scores(q, k, w):
    return ref_window_probs(q, k, w).sum(2).view(B, HKV, G, -1).mean(2)


def ref_recent(n, r):
    return (torch.arange(n) >= n - r).expand(B, HKV, n)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_matches_rule(pooling):
    q, k, v = _qkv()
    cache = KVCache("snapkv", budget=16, window=6, kernel=5, pooling=pooling)
    _step(cache, q, k, v)
    _assert_topk(ref_snapkv(q, k, 6, 5, pooling), _kept_mask(cache, N), 16)
    if pooling == "avg":  # no ties: exactly the same positions
        want = ref_snapkv(q, k, 6, 5, pooling).topk(16, -1).indices.sort(-1).values
        assert torch.equal(cache.kept_positions(0), want)


def test_knorm_keydiff_random_streaming_rules():
    q, k, v = _qkv()
    for policy, ref in [
        ("knorm", -k.norm(dim=-1)),
        ("keydiff", -F.cosine_similarity(k, F.normalize(k, dim=-1).mean(2, keepdim=True), dim=-1)),
    ]:
        cache = KVCache(policy, budget=12)
        _step(cache, q, k, v)
        want = ref.topk(12, -1).indices.sort(-1).values
        assert torch.equal(cache.kept_positions(0), want), policy
    cache = KVCache("streaming", budget=12, sink=4)
    _step(cache, q, k, v)
    want = torch.cat([torch.arange(4), torch.arange(N - 8, N)]).expand(B, HKV, 12)
    assert torch.equal(cache.kept_positions(0), want)
    a, b = KVCache("random", budget=12, seed=3), KVCache("random", budget=12, seed=3)
    _step(a, q, k, v), _step(b, q, k, v)
    assert torch.equal(a.kept_positions(0), b.kept_positions(0))


def test_tova_rule():
    q, k, v = _qkv()
    cache = KVCache("tova", budget=12)
    _step(cache, q, k, v)
    last = ref_window_probs(q, k, 1)[:, :, 0].mean(1, keepdim=True).expand(B, HKV, N)  # all heads of the layer
    _assert_topk(last, _kept_mask(cache, N), 12)
    # decode: evict the lowest attention of the newest query at every step
    q1, k1, v1 = _qkv(1, seed=5)
    _step(cache, q1, k1, v1)
    assert cache.kept_positions(0).shape[-1] == 12


def test_h2o_rule_prefill_and_decode():
    q, k, v = _qkv()
    cache = KVCache("h2o", budget=16, window=8, recent_ratio=0.25)
    _step(cache, q, k, v)
    acc = ref_h2o_scores(q, k, 8)
    _assert_topk(acc, _kept_mask(cache, N), 16, forced=ref_recent(N, 4))
    # one decode step: its attention over the kept set (+ itself) adds to the scores
    kept = _kept_mask(cache, N)
    q1, k1, v1 = _qkv(1, seed=7)
    out = _step(cache, q1, k1, v1)
    k_all, v_all = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
    allowed = torch.cat([kept, torch.ones(B, HKV, 1, dtype=torch.bool)], -1)
    ref = reference_attention(q1, k_all, v_all, mask=allowed.repeat_interleave(G, 1)[:, :, None], scale=SCALE)
    torch.testing.assert_close(out, ref)
    logits = (q1 @ k_all.repeat_interleave(G, 1).transpose(-1, -2) * SCALE)
    logits = logits.masked_fill(~allowed.repeat_interleave(G, 1)[:, :, None], float("-inf"))
    acc = F.pad(acc, (0, 1)) * allowed + logits.softmax(-1)[:, :, 0].view(B, HKV, G, -1).mean(2)
    _assert_topk(acc.masked_fill(~allowed, float("-inf")), _kept_mask(cache, N + 1), 16,
                 forced=allowed & (allowed.long().cumsum(-1) > 16 + 1 - 4))


def test_adakv_per_head_budgets_are_real():
    q, k, v = _qkv()
    cache = KVCache("adakv", budget=10, alpha_safeguard=0.2, scorer_config={"window": 4, "pooling": "avg", "kernel": 3})
    _step(cache, q, k, v)
    kept = _kept_mask(cache, N)
    assert bool((kept.sum((1, 2)) == 10 * HKV).all())  # the layer's total budget
    scores = ref_snapkv(q, k, 4, 3, "avg")
    floor = scores.topk(2, -1).indices
    assert bool(kept.gather(-1, floor).all())  # the safeguard
    rest = scores.masked_fill(torch.zeros_like(kept).scatter(-1, floor, True), float("-inf")).reshape(B, -1)
    lo = torch.where(kept.reshape(B, -1) & torch.isfinite(rest), rest, torch.tensor(float("inf"))).min(-1).values
    hi = rest.masked_fill(kept.reshape(B, -1), float("-inf")).max(-1).values
    assert bool((lo >= hi).all())
    # decode attends over each head's own kept set: equals the reference with per-head masks
    q1, k1, v1 = _qkv(1, seed=9)
    out = _step(cache, q1, k1, v1)
    allowed = torch.cat([kept, torch.ones(B, HKV, 1, dtype=torch.bool)], -1).repeat_interleave(G, 1)[:, :, None]
    ref = reference_attention(q1, torch.cat([k, k1], 2), torch.cat([v, v1], 2), mask=allowed, scale=SCALE)
    torch.testing.assert_close(out, ref)


def test_pyramid_budgets_average_to_budget():
    from attnkit.methods.kvcache.pyramidkv import pyramid_budget

    budgets = [pyramid_budget(128, 32, 20.0, i, 30) for i in range(30)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 128 > budgets[-1]
    assert abs(sum(budgets) / 30 - 128) <= 1


@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in NO_EXACT_SETTING])
def test_budget_above_length_is_exact(policy):
    q, k, v = _qkv()
    cache = KVCache(policy, **EXACT_CONFIG[policy]) if policy in EXACT_CONFIG else KVCache(policy, budget=N + 50)
    out = _step(cache, q, k, v)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True, scale=SCALE))
    for s in range(3):
        q1, k1, v1 = _qkv(1, seed=20 + s)
        k, v = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
        out = _step(cache, q1, k1, v1)
        torch.testing.assert_close(out, reference_attention(q1, k, v, scale=SCALE))
    assert cache.kept_positions(0).shape[-1] == N + 3


@pytest.mark.parametrize("policy", DROPPING)
def test_decode_output_is_attention_over_kept_set(policy):
    q, k, v = _qkv()
    small_window = {"window": 8} if policy in ("snapkv", "pyramidkv", "chunkkv") else {}  # a budget of 12 >= window
    cache = KVCache(policy, budget=12, when="both", **small_window)
    _step(cache, q, k, v)
    for s in range(3):
        kept = _kept_mask(cache, k.shape[2])
        q1, k1, v1 = _qkv(1, seed=30 + s)
        k, v = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
        out = _step(cache, q1, k1, v1)
        allowed = torch.cat([kept, torch.ones(B, HKV, 1, dtype=torch.bool)], -1)
        ref = reference_attention(q1, k, v, mask=allowed.repeat_interleave(G, 1)[:, :, None], scale=SCALE)
        torch.testing.assert_close(out, ref)
        per_head = (cache.kept_positions(0) >= 0).sum(-1)
        assert int(per_head.sum((1,)).max()) <= 12 * HKV
        if policy not in ("adakv", "pyramidkv"):
            assert int(per_head.max()) <= 12


def test_left_padding_is_never_kept():
    q, k, v = _qkv()
    pad = 7  # row 1 is left-padded by 7 tokens
    real = torch.ones(B, N, dtype=torch.bool)
    real[1, :pad] = False
    mask = torch.ones(N, N, dtype=torch.bool).tril()[None] & real[:, None, :]
    mask = mask[:, None]
    cache = KVCache("snapkv", budget=12, window=4, pooling="avg", kernel=3)
    _step(cache, q, k, v, mask=mask)
    pos = cache.kept_positions(0)
    assert bool((pos[1] >= pad).all())
    # row 1 selects as if it were alone
    alone = KVCache("snapkv", budget=12, window=4, pooling="avg", kernel=3)
    _step(alone, q[1:, :, pad:], k[1:, :, pad:], v[1:, :, pad:])
    assert torch.equal(pos[1] - pad, alone.kept_positions(0)[0])


def test_ratio_and_config_errors():
    q, k, v = _qkv()
    cache = KVCache("knorm", ratio=0.75)
    _step(cache, q, k, v)
    assert cache.kept_positions(0).shape[-1] == int(N * 0.25)
    with pytest.raises(ValueError, match="budget"):
        KVCache("snapkv")
    with pytest.raises(ValueError, match="not both"):
        KVCache("snapkv", budget=4, ratio=0.5)
    with pytest.raises(ValueError, match="unknown config field"):
        KVCache("snapkv", budget=4, windw=3)
    with pytest.raises(ValueError, match="KV-cache policy"):
        KVCache("snapkvv", budget=4)
    with pytest.raises(ValueError, match="when"):
        KVCache("snapkv", budget=4, when="later")


def test_registry_one_name_two_kinds():
    info = ak.method_info("streaming")
    assert info.kinds == ("prefill", "cache")
    assert ak.get("streaming", sink=4, window=8).name == "streaming"  # the prefill method still works
    assert {"snapkv", "h2o", "tova", "knorm", "random", "pyramidkv", "adakv"} <= set(POLICIES)


def test_stats_and_nbytes():
    q, k, v = _qkv()
    cache = KVCache("snapkv", budget=10, window=4)
    _step(cache, q, k, v)
    st = cache.stats()
    assert st["kept_per_layer"] == [10] and st["seen"] == N
    assert cache.nbytes() < cache.full_nbytes()


def test_budget_below_always_kept_is_an_error():
    from attnkit.methods.kvcache.base import BudgetBelowAlwaysKept

    with pytest.raises(BudgetBelowAlwaysKept, match="below the 32 tokens it always keeps: observation window"):
        KVCache("snapkv", budget=10)
    with pytest.raises(BudgetBelowAlwaysKept, match="attention sinks, sink=4"):
        KVCache("streaming", budget=3)
    with pytest.raises(BudgetBelowAlwaysKept, match="sink=4 \\+ recent=16"):
        KVCache("tokenselect", budget=8)
    # a ratio is checked at prefill, against the prompt's length: 10% of N=64 tokens < 32
    q, k, v = _qkv()
    cache = KVCache("snapkv", ratio=0.9)
    with pytest.raises(BudgetBelowAlwaysKept, match="ratio=0.9 of"):
        _step(cache, q, k, v)
        cache.compress()


def test_ties_keep_the_most_recent_slots():
    from attnkit.methods.kvcache.base import topk_per_head

    scores = torch.tensor([[[float("inf")] * 6 + [1.0, 2.0]]])  # six always-kept slots, budget 4
    valid = torch.ones_like(scores, dtype=torch.bool)
    kept = topk_per_head(scores, torch.tensor([4]), valid)
    assert kept[0, 0].nonzero().flatten().tolist() == [2, 3, 4, 5]
    equal = topk_per_head(torch.zeros(1, 1, 6), torch.tensor([2]), torch.ones(1, 1, 6, dtype=torch.bool))
    assert equal[0, 0].nonzero().flatten().tolist() == [4, 5]
