"""Evicting KV-cache policies beyond the core set of test_kvcache.py (chunkkv,
scissorhands, compose, duo, expected_attention) on small tensors: each against a reference
written here from the paper's rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kv_helpers import HKV, HQ, SCALE, B, D, G, N, _qkv, _step, check_output, topk_mask  # noqa: F401

from attnkit.kvcache import KVCache
from attnkit.reference import reference_attention

# --- chunkkv ----------------------------------------------------------------------------


def ref_snapkv_votes(q, k, w, kernel, pooling):
    n = k.shape[2]
    logits = q[:, :, -w:] @ k.repeat_interleave(G, 1).transpose(-1, -2) * SCALE
    logits = logits.masked_fill(torch.arange(n)[None, :] > torch.arange(n - w, n)[:, None], float("-inf"))
    p = logits.softmax(-1)[..., : n - w].mean(-2)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    p = pool(p, kernel, stride=1, padding=kernel // 2)
    return p.view(B, HKV, G, n - w).mean(2)


def test_chunkkv_keeps_whole_chunks_by_summed_votes():
    q, k, v = _qkv()
    w, size, budget = 4, 5, 19
    cache = KVCache("chunkkv", budget=budget, window=w, kernel=3, pooling="avg", chunk_size=size)
    _step(cache, q, k, v)
    votes = ref_snapkv_votes(q, k, w, 3, "avg")  # (B, HKV, N - w): chunks of the tokens before the window
    want = torch.zeros(B, HKV, N, dtype=torch.bool)
    want[..., N - w:] = True
    for b in range(B):
        for h in range(HKV):
            chunks = [list(range(s, min(s + size, N - w))) for s in range(0, N - w, size)]
            chunks.sort(key=lambda c: -float(votes[b, h, c].sum()))
            left = budget - w
            for c in chunks:
                take = c[: max(left, 0)]
                want[b, h, take] = True
                left -= len(take)
    kept = torch.zeros(B, HKV, N, dtype=torch.bool).scatter(-1, cache.kept_positions(0), True)
    assert torch.equal(kept, want)
    assert cache.kept_positions(0).shape[-1] == budget


# --- scissorhands -------------------------------------------------------------------------


def test_scissorhands_counts_importance_in_history_window():
    q, k, v = _qkv()
    hist, budget = 6, 16
    cache = KVCache("scissorhands", budget=budget, history=hist, recent_ratio=0.25)
    _step(cache, q, k, v)
    logits = q[:, :, -hist:] @ k.repeat_interleave(G, 1).transpose(-1, -2) * SCALE
    qpos = torch.arange(N - hist, N)[:, None]
    logits = logits.masked_fill(torch.arange(N)[None, :] > qpos, float("-inf"))
    attn = logits.softmax(-1).view(B, HKV, G, hist, N).mean(2)  # (B, HKV, hist, N)
    counts = (attn > 1.0 / (qpos + 1).double()).sum(2).double()
    counts[..., N - budget // 4:] = float("inf")  # recent tokens kept
    kept = torch.zeros(B, HKV, N, dtype=torch.bool).scatter(-1, cache.kept_positions(0), True)
    assert bool((kept.sum(-1) == budget).all())
    lo = counts.masked_fill(~kept, float("inf")).min(-1).values
    hi = counts.masked_fill(kept, float("-inf")).max(-1).values
    assert bool((lo >= hi).all())  # a top-k of the counts (ties allowed)
    # decode: the newest query's flags replace those of the query `hist` steps before
    q1, k1, v1 = _qkv(1, seed=60)
    _step(cache, q1, k1, v1)
    assert int((cache.kept_positions(0) >= 0).sum(-1).max()) == budget


# --- compose --------------------------------------------------------------------------------


def test_compose_prefill_snapkv_then_decode_tova():
    q, k, v = _qkv()
    cfg = dict(window=4, kernel=3, pooling="avg")
    cache = KVCache("compose", budget=12, prefill="snapkv", decode="tova", prefill_config=cfg)
    alone = KVCache("snapkv", budget=12, **cfg)
    _step(cache, q, k, v), _step(alone, q, k, v)
    assert torch.equal(cache.kept_positions(0), alone.kept_positions(0))  # prefill: SnapKV's selection
    kept = cache.kept_positions(0)
    q1, k1, v1 = _qkv(1, seed=70)
    _step(cache, q1, k1, v1)
    cache.compress()
    # decode: TOVA evicts the slot the newest query (layer head-average) attends to least
    slots = torch.cat([kept, torch.full((B, HKV, 1), N)], -1)
    k_all = torch.cat([k, k1], 2)
    ks = k_all.gather(2, slots[..., None].expand(-1, -1, -1, D)).repeat_interleave(G, 1)
    attn = (q1 @ ks.transpose(-1, -2) * SCALE).softmax(-1)[:, :, 0].mean(1)  # (B, 13)
    drop = slots[:, 0].gather(-1, attn.argmin(-1, keepdim=True))
    for b in range(B):
        want = slots[b, 0][slots[b, 0] != drop[b]]
        assert torch.equal(cache.kept_positions(0)[b, 0], want)


def test_compose_with_quest_decode_and_errors():
    q, k, v = _qkv()
    cache = KVCache("compose", budget=16, prefill="snapkv", decode="quest",
                    prefill_config=dict(window=4), decode_config=dict(page_size=4, skip_layers=0))
    assert cache.when == "prefill" and cache.policy.selects()
    _step(cache, q, k, v)
    assert cache.kept_positions(0).shape[-1] == 16
    q1, k1, v1 = _qkv(1, seed=71)
    out = _step(cache, q1, k1, v1)
    assert torch.isfinite(out).all() and cache.kept_positions(0).shape[-1] == 17
    with pytest.raises(ValueError, match="quantized"):
        KVCache("compose", budget=8, decode="quantized")
    with pytest.raises(ValueError, match="other policies"):
        KVCache("compose", budget=8, decode="compose")


# --- duo ------------------------------------------------------------------------------------


def test_duo_plan_and_heuristic_roles(tmp_path):
    q, k, v = _qkv()
    plan = tmp_path / "plan.json"
    plan.write_text('{"0": [1, 0]}')
    cache = KVCache("duo", budget=12, sink=4, plan=str(plan))
    _step(cache, q, k, v)
    pos = cache.kept_positions(0)
    assert torch.equal(pos[:, 0], torch.arange(N).expand(B, N))  # retrieval head: full cache
    stream = torch.cat([torch.arange(4), torch.arange(N - 8, N)])
    assert torch.equal(pos[:, 1, :12], stream.expand(B, 12)) and bool((pos[:, 1, 12:] == -1).all())
    q1, k1, v1 = _qkv(1, seed=80)
    out = _step(cache, q1, k1, v1)
    allowed = torch.zeros(B, HKV, N + 1, dtype=torch.bool)
    allowed[:, 0] = True
    allowed[:, 1, stream] = True
    allowed[:, 1, N] = True
    ref = reference_attention(q1, torch.cat([k, k1], 2), torch.cat([v, v1], 2),
                              mask=allowed.repeat_interleave(G, 1)[:, :, None], scale=SCALE)
    torch.testing.assert_close(out, ref)
    # heuristic: the head whose window attention reaches furthest outside sinks + recent
    cache = KVCache("duo", budget=12, sink=4, window=6, retrieval_ratio=0.5)
    _step(cache, q, k, v)
    logits = q[:, :, -6:] @ k.repeat_interleave(G, 1).transpose(-1, -2) * SCALE
    logits = logits.masked_fill(torch.arange(N)[None, :] > torch.arange(N - 6, N)[:, None], float("-inf"))
    probs = logits.softmax(-1).view(B, HKV, G, 6, N).mean((2, 3))
    far = probs[..., 4:N - 8].sum(-1).mean(0)
    full_head = int(far.argmax())
    assert int((cache.kept_positions(0)[:, full_head] >= 0).sum(-1).min()) == N
    assert int((cache.kept_positions(0)[:, 1 - full_head] >= 0).sum(-1).max()) == 12
    with pytest.raises(ValueError, match="roles"):
        KVCache("duo", budget=8, plan={0: [2, 0]})


# --- expected_attention ---------------------------------------------------------------------


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + half * sin


def test_expected_attention_rule():
    theta, w, fut, sink, budget = 100.0, 10, 16, 2, 14
    q_pre, k, v = _qkv()
    q = _rope(q_pre, torch.arange(N), theta)  # the layer sees RoPE'd queries
    cache = KVCache("expected_attention", budget=budget, window=w, n_future_positions=fut, n_sink=sink,
                    rope_theta=theta)
    _step(cache, q, k, v)
    # reference: Gaussian statistics of the pre-RoPE window queries, average future rotation
    x = q_pre[:, :, -w:]
    mu = x.mean(2)
    cov = (x - mu[:, :, None]).transpose(-1, -2) @ (x - mu[:, :, None]) / w
    eye = torch.eye(D, dtype=torch.float64)
    rots = torch.stack([_rope(eye, torch.full((D,), p), theta).T for p in range(N, N + fut)])  # R(p) x
    rot = rots.mean(0)
    mu, cov = mu @ rot.T, rot @ cov @ rot.T
    kk = k.repeat_interleave(G, 1)[:, :, sink:]
    logits = (kk @ mu[..., None])[..., 0] / math.sqrt(D) + torch.einsum("bhnd,bhde,bhne->bhn", kk, cov, kk) / (2 * D)
    scores = logits.softmax(-1).view(B, HKV, G, -1).mean(2) * v[:, :, sink:].norm(dim=-1)
    scores = F.pad(scores, (sink, 0), value=float("inf"))
    want = scores.topk(budget, -1).indices.sort(-1).values
    assert torch.equal(cache.kept_positions(0), want)
