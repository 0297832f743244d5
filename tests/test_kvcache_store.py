"""Storing KV-cache policies (mode "store": quantized/KIVI, ThinK key-channel pruning,
ZipCache mixed-precision quantization) on small float64 tensors: each rule re-implemented
here from the paper's description; decode outputs against ``reference_attention`` over
the keys/values the rule leaves, and the bytes held."""

from __future__ import annotations

import math

import pytest
import torch
from kv_helpers import HKV, HQ, SCALE, B, D, G, N, _qkv, _step, check_output, topk_mask  # noqa: F401

from attnkit.cache_tag import cache_layer_of
from attnkit.kvcache import KVCache
from attnkit.methods.kvcache.zipcache import probe_indices
from attnkit.reference import reference_attention

# --- quantized (KIVI) ------------------------------------------------------------------


def ref_quant(x, bits):
    """Asymmetric quantization of each row of x (..., G): (dequantized, scale)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    code = ((x - lo) / scale).round().clamp(0, 2**bits - 1)
    return code * scale + lo, scale


def ref_kivi(k, v, bits, group, residual):
    """KIVI's rule: keys in chunks of `residual` tokens, per channel over groups of `group`
    tokens; values per token over groups of `group` channels, the newest `residual` exact."""
    b, h, n, d = k.shape
    mk = (n // residual) * residual
    xk = k[:, :, :mk].reshape(b, h, mk // group, group, d).transpose(-1, -2)
    dk, sk = ref_quant(xk, bits)
    k_deq = torch.cat([dk.transpose(-1, -2).reshape(b, h, mk, d), k[:, :, mk:]], 2)
    sk = sk.expand_as(xk).transpose(-1, -2).reshape(b, h, mk, d)
    mv = max(n - residual, 0)
    xv = v[:, :, :mv].reshape(b, h, mv, d // group, group)
    dv, sv = ref_quant(xv, bits)
    v_deq = torch.cat([dv.reshape(b, h, mv, d), v[:, :, mv:]], 2)
    return k_deq, v_deq, sk, sv.expand_as(xv).reshape(b, h, mv, d), mk, mv


@pytest.mark.parametrize("bits", [2, 4])
def test_quantized_round_trip_outputs_and_bytes(bits):
    q, k, v = _qkv()
    group, residual = 4, 8
    cache = KVCache("quantized", bits=bits, group_size=group, residual=residual)
    out = _step(cache, q, k, v)
    store = cache.layers[0].store
    k_deq, v_deq = store.load()
    rk, rv, sk, sv, mk, mv = ref_kivi(k, v, bits, group, residual)
    assert mk == 40 and mv == 32
    # round-trip error within the bound the bit-width allows, and the reference's values
    assert bool(((k - k_deq).abs() <= sk_full(sk, k, mk) / 2 + 1e-12).all())
    assert bool(((v[:, :, :mv] - v_deq[:, :, :mv]).abs() <= sv / 2 + 1e-12).all())
    torch.testing.assert_close(k_deq, rk)
    torch.testing.assert_close(v_deq, rv)
    assert torch.equal(v_deq[:, :, mv:], v[:, :, mv:])  # the recent window is exact
    assert int((k - k_deq).abs().max()) < 10 and float((k - k_deq).abs().max()) > 0
    torch.testing.assert_close(out, reference_attention(q, rk, rv, causal=True, scale=SCALE))
    # decode: tokens enter the full-precision window; keys quantized when `residual` accumulate
    for s in range(9):
        q1, k1, v1 = _qkv(1, seed=10 + s)
        k, v = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
        out = _step(cache, q1, k1, v1)
    rk, rv, *_ = ref_kivi(k, v, bits, group, residual)
    torch.testing.assert_close(out, reference_attention(q1, rk, rv, scale=SCALE))
    assert cache.layers[0].keys is None  # the dequantized read-out is not held
    assert torch.equal(cache.kept_positions(0), torch.arange(N + 9).expand(B, HKV, N + 9))
    assert store.nbytes() < 0.7 * cache.full_nbytes()  # tiny groups: scales dominate here
    assert store.kq.dtype == torch.uint8 and store.kq.shape[-1] == D * bits // 8


def test_quantized_bytes_at_model_like_shapes():
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 1, 3, 512, 64, generator=gen)
    cache = KVCache("quantized", bits=2, group_size=32, residual=32)
    keys, _ = cache.update(k, v, 0)
    cache_layer_of(keys).attention(torch.randn(1, 9, 512, 64), None, 0.125, lambda: torch.zeros(1))
    store = cache.layers[0].store
    assert store.nbytes() * 6 < cache.full_nbytes(), (store.nbytes(), cache.full_nbytes())
    assert cache.nbytes() * 4 < cache.full_nbytes()  # slot positions (int64) included


def sk_full(sk, k, mk):
    return torch.cat([sk, torch.zeros_like(k[:, :, mk:])], 2)


def test_quantized_config_and_budget_errors():
    with pytest.raises(ValueError, match="bits"):
        KVCache("quantized", bits=3)
    with pytest.raises(ValueError, match="residual"):
        KVCache("quantized", group_size=32, residual=48)
    with pytest.raises(ValueError, match="no budget"):
        KVCache("quantized", budget=16)


# --- ThinK ---------------------------------------------------------------------------------


def ref_think_pruned(q, k, window, ratio, real=None):
    """(B, HKV, D) bool: the channels ThinK removes. Per (row, KV head), channel j scores
    mean_w q_j^2 (the last `window` queries, averaged over the head's query heads) times
    mean_t k_j^2 (the row's real tokens); the int(D * ratio) lowest go."""
    real = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool) if real is None else real
    out = torch.zeros(k.shape[0], HKV, D, dtype=torch.bool)
    for b in range(k.shape[0]):
        for h in range(HKV):
            qh = q[b, h * G:(h + 1) * G, -window:]  # (G, W, D)
            q_stat = (qh ** 2).mean(dim=1).mean(dim=0)
            k_stat = (k[b, h, real[b]] ** 2).mean(dim=0)
            lowest = sorted(range(D), key=lambda j: float(q_stat[j] * k_stat[j]))[: int(D * ratio)]
            out[b, h, lowest] = True
    return out


def zero_pruned(k, pruned, upto):
    """k with the pruned channels of tokens [0, upto) set to zero."""
    k = k.clone()
    mask = torch.zeros_like(k, dtype=torch.bool)
    mask[:, :, :upto] = pruned[:, :, None, :]
    return k.masked_fill(mask, 0.0)


def test_think_keeps_the_reference_channels_and_attends_like_zeroed_keys():
    q, k, v = _qkv()
    window, recent, ratio = 6, 8, 0.5
    cache = KVCache("think", pruning_ratio=ratio, window=window, recent=recent)
    out = _step(cache, q, k, v)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True, scale=SCALE))  # prefill: exact
    pruned = ref_think_pruned(q, k, window, ratio)
    store = cache.layers[0].store
    assert torch.equal(store.channels, (~pruned).nonzero()[:, 2].view(B, HKV, D - D // 2))
    assert store.k_pruned.shape == (B, HKV, N - recent, D - D // 2)
    k_ref = zero_pruned(k, pruned, N - recent)
    for s in range(4):  # decode keys stay whole
        q1, k1, v1 = _qkv(1, seed=10 + s)
        k_ref, k, v = torch.cat([k_ref, k1], 2), torch.cat([k, k1], 2), torch.cat([v, v1], 2)
        out = _step(cache, q1, k1, v1)
        torch.testing.assert_close(out, reference_attention(q1, k_ref, v, scale=SCALE))
    assert cache.layers[0].keys is None  # the full-width read-out is not held
    assert torch.equal(cache.kept_positions(0), torch.arange(N + 4).expand(B, HKV, N + 4))
    # bytes: pruned keys (D/2 wide) + whole keys + values + kept channel indices
    n_all = N + 4
    want = B * HKV * ((N - recent) * (D // 2) + (n_all - N + recent) * D + n_all * D) * 8 + B * HKV * (D // 2) * 8
    assert store.nbytes() == want
    assert store.nbytes() < cache.full_nbytes()


def test_think_chunked_prefill_reuses_the_channels():
    q, k, v = _qkv()
    window, recent, ratio = 4, 8, 0.4
    cache = KVCache("think", pruning_ratio=ratio, window=window, recent=recent)
    _step(cache, q[:, :, :24], k[:, :, :24], v[:, :, :24])
    pruned = ref_think_pruned(q[:, :, :24], k[:, :, :24], window, ratio)  # chosen on the first chunk
    out = _step(cache, q[:, :, 24:], k[:, :, 24:], v[:, :, 24:])
    k_ref = zero_pruned(k, pruned, 24 - recent)  # chunk 2 attends to what chunk 1 left
    torch.testing.assert_close(out, reference_attention(q[:, :, 24:], k_ref, v, causal=True, scale=SCALE))
    k_ref = zero_pruned(k, pruned, N - recent)  # then everything but the recent window is pruned
    q1, k1, v1 = _qkv(1, seed=3)
    out = _step(cache, q1, k1, v1)
    ref = reference_attention(q1, torch.cat([k_ref, k1], 2), torch.cat([v, v1], 2), scale=SCALE)
    torch.testing.assert_close(out, ref)


def test_think_padded_row_chooses_as_if_alone():
    q, k, v = _qkv()
    pad = 7
    real = torch.ones(B, N, dtype=torch.bool)
    real[1, :pad] = False
    mask = (torch.ones(N, N, dtype=torch.bool).tril()[None] & real[:, None, :])[:, None]
    cache = KVCache("think", pruning_ratio=0.5, window=4, recent=4)
    _step(cache, q, k, v, mask=mask)
    pruned = ref_think_pruned(q, k, 4, 0.5, real=real)
    assert torch.equal(cache.layers[0].store.channels, (~pruned).nonzero()[:, 2].view(B, HKV, D // 2))


def test_think_config_errors():
    for kw, needle in [({"pruning_ratio": 1.0}, "pruning_ratio"), ({"pruning_ratio": -0.1}, "pruning_ratio"),
                       ({"window": 0}, "window"), ({"recent": -1}, "recent"),
                       ({"budget": 16}, "no budget"), ({"ratio": 0.5}, "no budget")]:
        with pytest.raises(ValueError, match=needle):
            KVCache("think", **kw)
    with pytest.raises(ValueError, match="compose"):
        KVCache("compose", budget=8, decode="think")


# --- ZipCache ------------------------------------------------------------------------------


def ref_normalized_scores(q, keys, probes, first=0):
    """(B, HKV, n) normalized attention of the tokens first: of `keys` (B, HKV, L, D): per
    query head, attention summed over the probe queries (positions `probes`, causal) and
    divided by the number of probes at or after the token; mean over each KV head's heads."""
    length = keys.shape[2]
    logits = q @ keys.repeat_interleave(G, 1).transpose(-1, -2) * SCALE  # (B, HQ, P, L)
    logits = logits.masked_fill(torch.arange(length)[None, :] > probes[:, None], float("-inf"))
    sums = logits.softmax(-1).sum(2)[..., first:]
    counts = torch.tensor([sum(int(p) >= j for p in probes) for j in range(first, length)], dtype=sums.dtype)
    return (sums / counts).view(keys.shape[0], HKV, G, -1).mean(2)


def ref_salient(scores, ratio):
    n = scores.shape[-1]
    top = scores.topk(round(ratio * n), -1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True)


def ref_quant_rows(x, bits):
    """Asymmetric uniform quantization of each row of x (..., m): (dequantized, scale)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo) / (2 ** bits - 1)
    code = ((x - lo) / torch.where(scale > 0, scale, 1)).round()
    return code * scale + lo, scale.expand_as(x)


def ref_quantize(x, bits, kind, group=4):
    """One subset x (m, D) -> (dequantized, per-element error bound)."""
    if kind == "channel":  # one group per channel over the subset's tokens
        deq, scale = ref_quant_rows(x.T, bits)
        return deq.T, scale.T / 2
    if kind == "cst":  # channel-separable tokenwise: divide by sqrt(max|x_j|), per token, multiply back
        c = x.abs().amax(0, keepdim=True).sqrt()
        deq, scale = ref_quant_rows(x / c, bits)
        return deq * c, scale * c / 2
    deq, scale = ref_quant_rows(x.reshape(x.shape[0], -1, group), bits)  # groups of channels per token
    return deq.reshape(x.shape), scale.reshape(x.shape) / 2


def ref_zipcache(x, salient, kind, high=4, low=2):
    """x (B, HKV, n, D), salient (B, HKV, n): each (row, head)'s salient tokens quantized
    together at `high` bits, the others at `low` -> (dequantized, bound, bits per element)."""
    deq, bound, bits = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            for sel, nbits in ((salient[b, h], high), (~salient[b, h], low)):
                if sel.any():
                    deq[b, h, sel], bound[b, h, sel] = ref_quantize(x[b, h, sel], nbits, kind)
                    bits[b, h, sel] = nbits
    return deq, bound, bits


def zip_bytes(m_hi, m_lo, d, elt, n, key_quant="channel", value_quant="cst", hi_bits=4, lo_bits=2, group=4):
    """Bytes per (row, head) of one chunk of n tokens, from the storage layout."""
    def subset(m, bits, kind):
        if m == 0:
            return 0
        codes = m * math.ceil(d * bits / 8)
        params = {"channel": 2 * d, "cst": 2 * m + d, "token": 2 * m * math.ceil(d / group)}[kind] * elt
        return codes + params
    total = math.ceil(n / 8)  # the 1-bit salient mask
    for m, bits in ((m_hi, hi_bits), (m_lo, lo_bits)):
        total += subset(m, bits, key_quant) + subset(m, bits, value_quant)
    return total


def test_probe_indices_mix_recent_and_random():
    idx = probe_indices(200, 0.05, 0.05, seed=3)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert idx[-10:].tolist() == list(range(190, 200))  # the last 5%
    assert bool((idx[:10] < 190).all())  # 5% drawn from the others
    assert torch.equal(idx, probe_indices(200, 0.05, 0.05, seed=3))
    assert probe_indices(40, 0.0, 0.0, seed=0).tolist() == [39]  # at least the last query


@pytest.mark.parametrize(("key_quant", "value_quant"), [("channel", "cst"), ("cst", "token")])
def test_zipcache_salient_set_round_trip_and_bytes(key_quant, value_quant):
    q, k, v = _qkv()
    ratio = 0.6
    kw = {"salient_ratio": ratio, "key_quant": key_quant, "value_quant": value_quant, "group_size": 4, "residual": 4}
    cache = KVCache("zipcache", recent_probes=0.25, random_probes=0.0, **kw)
    out = _step(cache, q, k, v)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True, scale=SCALE))  # prefill: exact
    probes = torch.arange(N - 10, N)  # the last 25% of the prompt's queries
    salient = ref_salient(ref_normalized_scores(q[:, :, probes], k, probes), ratio)
    store = cache.layers[0].store
    assert torch.equal(store.salient_mask(), salient)
    assert bool((salient.sum(-1) == 24).all())
    # round trip: the reference quantizer's values, each element within scale / 2 of its group
    k_deq, v_deq = store.load()
    for x, x_deq, kind in ((k, k_deq, key_quant), (v, v_deq, value_quant)):
        ref, bound, bits = ref_zipcache(x, salient, kind)
        torch.testing.assert_close(x_deq, ref)
        assert bool(((x - x_deq).abs() <= bound + 1e-12).all())
        err = (x - x_deq).abs()
        assert float(err[bits == 4].mean()) < float(err[bits == 2].mean())  # salient tokens: finer
    want = B * HKV * zip_bytes(24, 16, D, 8, N, key_quant, value_quant)  # nothing pending
    assert store.nbytes() == want
    assert store.nbytes() < cache.full_nbytes()


def test_zipcache_decode_window_and_its_saliency():
    q, k, v = _qkv()
    residual, ratio = 4, 0.5
    cache = KVCache("zipcache", salient_ratio=ratio, residual=residual, recent_probes=0.25, random_probes=0.0)
    _step(cache, q, k, v)
    probes = torch.arange(N - 10, N)
    salient = ref_salient(ref_normalized_scores(q[:, :, probes], k, probes), ratio)
    k_pre, _, _ = ref_zipcache(k, salient, "channel")
    v_pre, _, _ = ref_zipcache(v, salient, "cst")
    # decode: new tokens stay exact until `residual` of them; each step's query is a probe
    qs, ks, vs = [], [], []
    for s in range(residual):
        q1, k1, v1 = _qkv(1, seed=20 + s)
        qs.append(q1), ks.append(k1), vs.append(v1)
        keys, values = torch.cat([k_pre, *ks], 2), torch.cat([v_pre, *vs], 2)
        out = _step(cache, q1, k1, v1)
        torch.testing.assert_close(out, reference_attention(q1, keys, values, scale=SCALE))
    # the chunk's normalized scores: step i's attention (over what it saw) to the chunk's tokens <= i
    acc = torch.zeros(B, HKV, residual, dtype=torch.float64)
    for i in range(residual):
        keys = torch.cat([k_pre, *ks[: i + 1]], 2)
        acc[..., : i + 1] += ref_normalized_scores(qs[i], keys, torch.tensor([N + i]), first=N)
    counts = torch.arange(residual, 0, -1, dtype=torch.float64)
    chunk_salient = ref_salient(acc / counts, ratio)
    store = cache.layers[0].store
    assert torch.equal(store.salient_mask(), torch.cat([salient, chunk_salient], -1))
    assert store.k_fp.shape[2] == 0 and len(store.chunks) == 2
    k_chunk, _, _ = ref_zipcache(torch.cat(ks, 2), chunk_salient, "channel")
    v_chunk, _, _ = ref_zipcache(torch.cat(vs, 2), chunk_salient, "cst")
    q1, k1, v1 = _qkv(1, seed=30)
    out = _step(cache, q1, k1, v1)
    ref = reference_attention(q1, torch.cat([k_pre, k_chunk, k1], 2), torch.cat([v_pre, v_chunk, v1], 2), scale=SCALE)
    torch.testing.assert_close(out, ref)
    assert torch.equal(cache.kept_positions(0), torch.arange(N + 5).expand(B, HKV, N + 5))


def test_zipcache_random_probes_and_reorder():
    q, k, v = _qkv()
    cache = KVCache("zipcache", recent_probes=0.1, random_probes=0.1, seed=5)
    _step(cache, q, k, v)
    probes = probe_indices(N, 0.1, 0.1, seed=5)  # layer 0: seed + 0
    assert len(probes) == 8
    salient = ref_salient(ref_normalized_scores(q[:, :, probes], k, probes), 0.6)
    store = cache.layers[0].store
    assert torch.equal(store.salient_mask(), salient)
    keys, values = store.load()
    cache.batch_select_indices(torch.tensor([1, 0]))  # beam reordering
    k2, v2 = store.load()
    assert torch.equal(k2, keys[[1, 0]]) and torch.equal(v2, values[[1, 0]])


def test_zipcache_bytes_at_model_like_shapes():
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 1, 3, 512, 64, generator=gen)
    cache = KVCache("zipcache")
    keys, _ = cache.update(k, v, 0)
    cache_layer_of(keys).attention(torch.randn(1, 9, 512, 64, generator=gen), None, 0.125,
                                              lambda: torch.zeros(1))
    store = cache.layers[0].store
    assert store.nbytes() == 3 * zip_bytes(307, 205, 64, 4, 512)  # round(0.6 * 512) salient
    assert store.nbytes() * 8 < cache.full_nbytes(), (store.nbytes(), cache.full_nbytes())
    assert cache.nbytes() * 6 < cache.full_nbytes()  # slot positions (int64) included


def test_zipcache_config_errors():
    for kw, needle in [({"salient_ratio": 1.5}, "salient_ratio"), ({"high_bits": 3}, "high_bits"),
                       ({"low_bits": 5}, "low_bits"), ({"high_bits": 2, "low_bits": 4}, "must not exceed"),
                       ({"key_quant": "group"}, "key_quant"), ({"residual": 0}, "residual"),
                       ({"random_probes": 2.0}, "random_probes"), ({"budget": 16}, "no budget")]:
        with pytest.raises(ValueError, match=needle):
            KVCache("zipcache", **kw)
