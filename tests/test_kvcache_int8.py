"""Quantized per-head storage (``KVCache(..., kv_bits=8)``, ``attnkit.kvcache_quant``):
ragged attention over int8 / 4-bit pages equals a float64 reference over the dequantized
keys and values; the quantization error is within half a step; ``nbytes()`` is the kept
tokens' codes, scales and positions; a tiny Llama decodes close to the unquantized cache;
bad ``kv_bits`` are clear errors; bench cache specs carry ``kv_bits``."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

import attnkit as ak
from attnkit.kvcache import KVCache
from attnkit.kvcache_ragged import RaggedKV
from attnkit.reference import reference_attention

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from kv_helpers import tiny_llama  # noqa: E402

transformers = pytest.importorskip("transformers")

HQ, HKV, D, PROMPT, NEW = 4, 2, 64, 300, 3
PLAN = {0: [1, 0], 1: [0, 1]}  # duo roles: one retrieval head per layer
QMAX = {8: 127, 4: 7}


def _dequantized(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Hand-written symmetric absmax quantization per token (last dim), in float32 as stored."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / QMAX[bits]
    codes = torch.round(x / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(-QMAX[bits], QMAX[bits])
    return codes * scale


def _reference(q, k, v, keep, first, scale):
    """float64 softmax attention of q (B, Hq, T, D) at positions first.. over keep (B, Hkv, L), causal."""
    g = q.shape[1] // k.shape[1]
    pos = torch.arange(k.shape[2])
    mask = keep[:, :, None, :] & (pos[None, :] <= (first + torch.arange(q.shape[2]))[:, None])
    return reference_attention(q.double(), k.double(), v.double(), mask=mask.repeat_interleave(g, 1), scale=scale)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [1, 2], ids=lambda g: f"gqa{g}")
def test_attention_over_quantized_pages_equals_dequantized_reference(group, bits):
    gen = torch.Generator().manual_seed(group + bits)
    b, hkv, length, d, scale = 2, 3, 37, 24, 0.2
    k, v = (torch.randn(b, hkv, length, d, generator=gen) * 3 for _ in range(2))
    keep = torch.rand(b, hkv, length, generator=gen) < torch.tensor([0.15, 0.6, 1.0]).view(1, hkv, 1)
    pos = torch.arange(length).expand(b, hkv, length)
    store = RaggedKV.from_padded(k, v, pos, keep, page=4, bits=bits)
    kq, vq = _dequantized(k, bits), _dequantized(v, bits)
    for t in (1, 3, 1, 5):  # decode steps and chunks appended to every head, one in-place eviction
        first = k.shape[2]
        k_new, v_new = torch.randn(2, b, hkv, t, d, generator=gen)
        store.append(k_new, v_new, torch.arange(first, first + t))
        k, v = torch.cat([k, k_new], 2), torch.cat([v, v_new], 2)
        kq, vq = torch.cat([kq, _dequantized(k_new, bits)], 2), torch.cat([vq, _dequantized(v_new, bits)], 2)
        keep = torch.cat([keep, torch.ones(b, hkv, t, dtype=torch.bool)], 2)
        q = torch.randn(b, hkv * group, t, d, generator=gen)
        out, _ = store.attend(q, scale, first)
        torch.testing.assert_close(out.double(), _reference(q, kq, vq, keep, first, scale), rtol=0, atol=1e-5)
        if t == 3:
            view = store.positions()
            drop = (torch.rand(view.shape, generator=gen) < 0.5) & (view >= 0)
            store.compact(~drop)
            rows, heads, slots = drop.nonzero(as_tuple=True)
            keep = keep.clone()
            keep[rows, heads, view[rows, heads, slots]] = False
    # the padded view is the dequantized kept tokens, and within half a step of the originals
    view = store.positions()
    valid = view >= 0
    pk, pv = store.padded()
    idx = view.clamp(min=0)[..., None].expand(-1, -1, -1, d)
    for got, deq, orig in ((pk, kq, k), (pv, vq, v)):
        assert torch.equal(got[valid], deq.gather(2, idx)[valid])
        orig = orig.gather(2, idx)[valid]
        bound = orig.abs().amax(-1, keepdim=True) / QMAX[bits] / 2
        assert bool(((got[valid] - orig).abs() <= bound * (1 + 1e-6)).all())


def test_quantization_error_is_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 64, generator=gen) * torch.logspace(-3, 2, 50).view(1, 1, 50, 1)
    x[0, 0, 0] = 0  # an all-zero token: scale 0, codes 0
    for bits in (8, 4):
        store = RaggedKV.from_padded(x, x, torch.arange(50).expand(2, 3, 50), torch.ones(2, 3, 50, dtype=torch.bool),
                                     bits=bits)
        keys = store.padded()[0]
        err = (keys - x).abs()
        assert bool((err <= x.abs().amax(-1, keepdim=True) / QMAX[bits] / 2 * (1 + 1e-6)).all())
        assert bool((keys[0, 0, 0] == 0).all())
        assert err.max() > 0


@pytest.mark.parametrize("bits", [8, 4])
def test_half_precision_and_batch_reorder_copy_the_codes(bits):
    """bf16 keys: attention close to the bf16-dequantized reference; a batch reorder /
    repeat (beam search) moves codes and scales as they are (no re-quantization)."""
    gen = torch.Generator().manual_seed(bits)
    b, hkv, length, d = 2, 2, 40, 64
    k, v = (torch.randn(b, hkv, length, d, generator=gen).bfloat16() for _ in range(2))
    keep = torch.rand(b, hkv, length, generator=gen) < torch.tensor([0.3, 0.9]).view(1, hkv, 1)
    store = RaggedKV.from_padded(k, v, torch.arange(length).expand(b, hkv, length), keep, bits=bits)
    q = torch.randn(b, 2 * hkv, 1, d, generator=gen).bfloat16()
    out, _ = store.attend(q, 0.125, length)
    pk, pv = store.padded()
    assert pk.dtype == torch.bfloat16
    mask = (store.positions() >= 0).repeat_interleave(2, 1)[:, :, None]
    ref = reference_attention(q.double(), pk.double(), pv.double(), mask=mask, scale=0.125)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-2)
    for fn in (lambda x: x[torch.tensor([1, 0, 1])], lambda x: x.repeat_interleave(2, dim=0)):
        moved = store.apply_batch(fn)
        assert moved.bits == bits and torch.equal(moved.positions(), fn(store.positions()))
        valid = moved.positions() >= 0
        for old, new in zip(store.k.tensors() + store.v.tensors(), moved.k.tensors() + moved.v.tensors()):
            assert torch.equal(fn(_padded_raw(old, store))[valid], _padded_raw(new, moved)[valid])


def _padded_raw(part: torch.Tensor, store: RaggedKV) -> torch.Tensor:
    """A pool part (Npages, P, ...) (codes or scales) in the padded (B, Hkv, L, ...) slot view."""
    rows = part.reshape(-1, *part.shape[2:])[store.slots().clamp(min=0)]
    return rows.view(store.batch, store.heads, -1, *part.shape[2:])


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_llama(HQ, HKV, D)


def _generate(model, cache):
    ids = torch.randint(3, 128, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    with ak.patch(model), torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=NEW, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


def _bytes_per_token(cache: KVCache, layer) -> int:
    """Bytes of one kept token of one KV head: codes of K and V, their float32 scales, an int32 position."""
    _, _, dk, dv, size = layer.kv_dims
    if cache.kv_bits is None:
        return (dk + dv) * size + 4
    return (dk + dv) * cache.kv_bits // 8 + 2 * 4 + 4


CASES = {
    "duo": dict(policy="duo", budget=64, plan=PLAN),
    "snapkv": dict(policy="snapkv", ratio=0.75, window=16),
    "tova": dict(policy="tova", budget=100),
}


@pytest.mark.parametrize("name", list(CASES))
def test_generation_close_to_unquantized_and_bytes_are_the_formula(llama, name):
    full = KVCache(**CASES[name])
    ref = _generate(llama, full)
    for bits in (8, 4):
        cache = KVCache(kv_bits=bits, **CASES[name])
        out = _generate(llama, cache)
        assert all(layer.ragged is not None and layer.ragged.bits == bits for layer in cache.layers)
        for layer_full, layer in zip(full.layers, cache.layers):  # the prompt's choice: the same tokens
            if name == "tova":  # evicts at every decode step, by scores over the quantized keys
                assert torch.equal(layer_full.kept_counts(), layer.kept_counts())
            else:
                assert torch.equal(layer_full.kept_positions(), layer.kept_positions())
        assert torch.equal(out.logits[0], ref.logits[0])  # prefill: full precision
        first = ref.logits[1]  # the first decode step reads the quantized pages
        err = (out.logits[1] - first).abs().max() / first.abs().max()
        assert err < (0.01 if bits == 8 else 0.1), (bits, float(err))
        kept = sum(int(layer.kept_counts().sum()) * _bytes_per_token(cache, layer) for layer in cache.layers)
        obs = sum(layer.obs_q.numel() * layer.obs_q.element_size() for layer in cache.layers
                  if layer.obs_q is not None)
        held = cache.nbytes()
        assert kept + obs <= held <= 1.10 * (kept + obs), (held, kept, obs)
        assert held < (0.35 if bits == 8 else 0.2) * full.nbytes() + obs, (held, full.nbytes())


def test_prompt_within_budget_is_quantized_too(llama):
    cache = KVCache("snapkv", budget=1000, kv_bits=8)  # nothing to evict: the prompt is still quantized
    _generate(llama, cache)
    assert all(layer.ragged is not None and int(layer.kept_counts().min()) == PROMPT + NEW - 1
               for layer in cache.layers)
    stats = cache.stats()
    assert stats["kv_bits"] == 8 and stats["nbytes"] < 0.4 * stats["full_nbytes"]


@pytest.mark.parametrize("kv_bits", [3, 16, "8", 8.0, True, 0])
def test_bad_kv_bits_is_a_clear_error(kv_bits):
    with pytest.raises(ValueError, match=r"kv_bits must be None \(full precision\), 8 \(int8\) or 4"):
        KVCache("snapkv", budget=64, kv_bits=kv_bits)


@pytest.mark.parametrize("args, match", [
    (dict(policy="snapkv", budget=64, layout="padded"), "layout='auto' or layout='ragged'"),
    (dict(policy="h2o", budget=64), "'h2o' accumulates"),
    (dict(policy="quest", budget=64), "'quest' selects"),
    (dict(policy="quantized", bits=4), "'quantized' stores its tokens itself"),
])
def test_kv_bits_needs_an_evicting_policy_in_ragged_storage(args, match):
    with pytest.raises(ValueError, match=match):
        KVCache(kv_bits=8, **args)


def test_bench_cache_spec_carries_kv_bits():
    from attnkit.bench import parse_budgets, parse_caches
    from attnkit.bench.spec import CacheRun

    spec, = parse_caches("duo(kv_bits=8,retrieval_ratio=0.5)")
    assert spec.label == "duo(kv_bits=8,retrieval_ratio=0.5)" and spec.uses_budget
    cache = CacheRun(spec, parse_budgets("10%")[0]).make()
    assert cache.kv_bits == 8 and cache.ratio == 0.9 and cache.policy.config.retrieval_ratio == 0.5
    with pytest.raises(ValueError, match="kv_bits must be"):
        parse_caches("snapkv(kv_bits=3)")


def test_docs_example_runs_as_written(capsys):
    """The example of docs/kv-cache.md's "Quantized per-head storage" prints what it says."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "kv-cache.md").read_text()
    section = doc.split("### Quantized per-head storage (`kv_bits`)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/kv-cache.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    promised = [line[2:].split("  ")[0].strip() for line in code.splitlines() if line.startswith("# ")]
    assert printed == promised


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_stats_after_generating_in_inference_mode(kv_bits):
    """A cache filled under torch.inference_mode (as the bench generates) reports its
    bytes afterwards: the scheduled compression runs in inference mode too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    kv = ak.KVCache("duo", budget=8, retrieval_ratio=0.5, kv_bits=kv_bits)
    with torch.inference_mode(), ak.patch(model):
        model.generate(torch.randint(0, 100, (1, 40)), max_new_tokens=3, past_key_values=kv, do_sample=False)
    stats = kv.stats()
    assert stats["nbytes"] > 0 and stats.get("kv_bits") == kv_bits
