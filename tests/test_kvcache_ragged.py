"""Per-head (ragged) KV storage, ``attnkit.kvcache_ragged``: the bytes held are the kept
tokens' (duo, adakv, pyramidkv, think on a tiny random Llama), ragged decode attention
equals a float64 reference over each head's own keys, generation gives the padded
layout's tokens, and a decode step allocates nothing of the padded (B, Hkv, L, D) size."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit as ak
from attnkit.kvcache import KVCache
from attnkit.kvcache_ragged import RaggedKV
from attnkit.reference import reference_attention

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from kv_helpers import B, _qkv, _step, tiny_llama  # noqa: E402

HQ, HKV, D, PROMPT, NEW = 4, 2, 64, 300, 4
PLAN = {0: [1, 0], 1: [0, 1]}  # duo roles: one retrieval head per layer
CASES = {  # policy -> KVCache arguments
    "duo": dict(policy="duo", budget=64, plan=PLAN),
    "adakv": dict(policy="adakv", budget=160, scorer_config={"window": 16}),
    "pyramidkv": dict(policy="pyramidkv", budget=160, window=16),
    "think": dict(policy="think", pruning_ratio=0.4),
}


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_llama(HQ, HKV, D)


def _prompt(batch: int = 1, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) (batch, PROMPT); the rows after the first are left-padded by ``pad``."""
    ids = torch.randint(3, 128, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1:, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _generate(model: torch.nn.Module, cache: KVCache, batch: int = 1, pad: int = 0):
    ids, mask = _prompt(batch, pad)
    with ak.patch(model), torch.no_grad():
        return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)


def _promised_bytes(cache: KVCache, name: str) -> int:
    """Sum over (row, layer, KV head) of the tokens kept x their bytes, plus the
    observation queries the policy keeps (B, Hq, W, D)."""
    total = 0
    for layer in cache.layers:
        b, h, dk, dv, size = layer.kv_dims
        if name == "think":
            c = cache.policy.config
            pruned = max(PROMPT - c.recent, 0)
            keep_k = dk - int(dk * c.pruning_ratio)
            total += b * h * size * (pruned * keep_k + (layer.seen - pruned) * dk + layer.seen * dv)
            continue
        total += int(layer.kept_counts().sum()) * (dk + dv) * size
        if layer.obs_q is not None:
            total += layer.obs_q.numel() * layer.obs_q.element_size()
    return total


@pytest.mark.parametrize("name", list(CASES))
def test_nbytes_are_the_kept_tokens_bytes(llama, name):
    cache = KVCache(**CASES[name])
    _generate(llama, cache)
    held, promised = cache.nbytes(), _promised_bytes(cache, name)
    assert promised <= held <= 1.10 * promised, (held, promised)
    if name == "think":
        assert held < 0.9 * cache.full_nbytes()
        return
    padded = KVCache(layout="padded", **CASES[name])
    _generate(llama, padded)
    differ = [bool((c != c.max()).any()) for c in (layer.kept_counts() for layer in cache.layers)]
    assert [layer.ragged is not None for layer in cache.layers] == differ
    if any(differ):  # duo, adakv: heads keep different counts
        assert held < padded.nbytes(), (held, padded.nbytes())
    else:  # pyramidkv: per-layer budgets, equal heads: the padded layout is already exact
        assert held <= padded.nbytes() * 1.10
    assert held < cache.full_nbytes()


def _reference(q, k, v, keep, first, scale):
    """float64 attention of q (B, Hq, T, D) at positions first.. over keep (B, Hkv, L), causal."""
    g = q.shape[1] // k.shape[1]
    pos = torch.arange(k.shape[2])
    qpos = first + torch.arange(q.shape[2])
    mask = keep[:, :, None, :] & (pos[None, :] <= qpos[:, None])
    return reference_attention(q.double(), k.double(), v.double(), mask=mask.repeat_interleave(g, 1), scale=scale)


@pytest.mark.parametrize("page", [4, 16], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("group", [1, 2, 3], ids=lambda g: f"gqa{g}")
def test_ragged_attention_equals_per_head_reference(group, page):
    gen = torch.Generator().manual_seed(group * 10 + page)
    b, hkv, length, d, scale = 2, 3, 37, 24, 0.2
    k = torch.randn(b, hkv, length, d, generator=gen)
    v = torch.randn(b, hkv, length, d, generator=gen)
    keep = torch.rand(b, hkv, length, generator=gen) < torch.tensor([0.15, 0.6, 1.0]).view(1, hkv, 1)
    pos = torch.arange(length).expand(b, hkv, length)
    store = RaggedKV.from_padded(k, v, pos, keep, page=page)
    assert torch.equal(store.counts(), keep.sum(-1))
    for t in (1, 3, 1, 1, 5):  # decode steps and short chunks, appended to every head
        first = k.shape[2]
        k_new, v_new = torch.randn(2, b, hkv, t, d, generator=gen)
        store.append(k_new, v_new, torch.arange(first, first + t))
        k, v = torch.cat([k, k_new], 2), torch.cat([v, v_new], 2)
        keep = torch.cat([keep, torch.ones(b, hkv, t, dtype=torch.bool)], 2)
        q = torch.randn(b, hkv * group, t, d, generator=gen)
        out, _ = store.attend(q, scale, first)
        torch.testing.assert_close(out.double(), _reference(q, k, v, keep, first, scale), rtol=0, atol=1e-5)
        if t == 3:  # evict about half of each head's tokens (ragged, in place)
            view = store.positions()
            drop = torch.rand(view.shape, generator=gen) < 0.5
            store.compact(~drop)
            keep = keep.clone()
            rows, heads, slots = (drop & (view >= 0)).nonzero(as_tuple=True)
            keep[rows, heads, view[rows, heads, slots]] = False
            assert torch.equal(store.counts(), keep.sum(-1))
    assert torch.equal(store.positions()[store.positions() >= 0], pos.new_tensor(
        [p for row in keep for head in row for p in head.nonzero().flatten().tolist()]))


@pytest.mark.parametrize("name", ["duo", "adakv", "pyramidkv"])
def test_generation_equals_padded_layout(llama, name):
    ragged = _generate(llama, KVCache(**CASES[name]), batch=2, pad=37)
    padded = _generate(llama, KVCache(layout="padded", **CASES[name]), batch=2, pad=37)
    assert torch.equal(ragged.sequences, padded.sequences)
    torch.testing.assert_close(torch.stack(ragged.logits), torch.stack(padded.logits), rtol=0, atol=1e-5)


def test_beam_search_equals_padded_layout(llama):
    """Beam search reorders the rows of a ragged layer (through the padded view)."""
    ids, mask = _prompt(2, pad=37)
    out = {}
    for layout in ("auto", "padded"):
        with ak.patch(llama), torch.no_grad():
            out[layout] = llama.generate(ids, attention_mask=mask, past_key_values=KVCache(layout=layout, **CASES["duo"]),
                                         max_new_tokens=NEW, num_beams=3, do_sample=False)
    assert torch.equal(out["auto"], out["padded"])


def test_chunked_prefill_with_padding_equals_padded_layout():
    """Chunks and decode steps after the layer went ragged (left-padded row): the same kept
    sets and outputs as the padded layout (SnapKV scores unpooled: pooling runs along the
    slots, and the padded layout's empty slots sit between kept and new tokens)."""
    q, k, v = _qkv(n=60, seed=3)
    mask = torch.ones(B, 1, 60, 60, dtype=torch.bool).tril()
    mask[1, :, :, :7] = False  # row 1: 7 padding tokens
    caches = {layout: KVCache("adakv", budget=10, layout=layout, scorer_config={"window": 4, "kernel": 1})
              for layout in ("auto", "padded")}
    for a, b in ((0, 30), (30, 45), (45, 46), (46, 47), (47, 53), (53, 54)):
        outs = {name: _step(cache, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], mask=mask[:, :, a:b, :b])
                for name, cache in caches.items()}
        torch.testing.assert_close(outs["auto"], outs["padded"], rtol=0, atol=1e-12)
    assert caches["auto"].layers[0].ragged is not None
    assert torch.equal(caches["auto"].kept_positions(0), caches["padded"].kept_positions(0))
    row = caches["auto"].kept_positions(0)[1]
    assert not bool(((row >= 0) & (row < 7)).any())  # padding never kept


class _Allocations(TorchDispatchMode):
    """Largest numel of any tensor an op allocates (outputs that share no input storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(x, torch.Tensor)}
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("layout", ["auto", "padded"])
def test_decode_step_allocates_no_padded_copy(llama, layout):
    cache = KVCache(layout=layout, **CASES["duo"])
    out = _generate(llama, cache)
    padded = max(layer.kv_dims[0] * layer.kv_dims[1] * layer.kept_counts().max() * D for layer in cache.layers)
    with ak.patch(llama), torch.no_grad(), _Allocations() as seen:
        llama(out.sequences[:, -1:], past_key_values=cache)
    if layout == "auto":
        assert all(layer.ragged is not None for layer in cache.layers)
        assert seen.largest < padded, (seen.largest, padded)
    else:  # the check sees the padded layout's copy (torch.cat of the whole cache)
        assert seen.largest >= padded
