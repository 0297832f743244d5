"""Decode steps write the new slot into spare room (kvcache_grow) instead of copying the
whole cache with torch.cat: the same tensors, the same generated tokens, the buffer
reused between steps and rebuilt when the layer replaced the tensor."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit import kvcache_grow
from attnkit.kvcache_grow import Growing


def test_growing_equals_cat_and_reuses_its_buffer(monkeypatch):
    monkeypatch.setattr(kvcache_grow, "MIN_SLOTS", 4)
    grow = Growing()
    held = torch.randn(2, 3, 5, 4)
    ref = held.clone()
    ptrs = set()
    for step in range(40):
        new = torch.randn(2, 3, 1, 4)
        held = grow.append("k", held, new)
        ref = torch.cat([ref, new], dim=2)
        assert torch.equal(held, ref)
        ptrs.add(held.untyped_storage().data_ptr())
    assert len(ptrs) < 5  # rebuilt only when the room ran out (64 spare slots, then len / 16)
    replaced = held[:, :, 10:].clone()  # the layer replaced its tensor (a compression)
    out = grow.append("k", replaced, torch.ones(2, 3, 1, 4))
    assert torch.equal(out, torch.cat([replaced, torch.ones(2, 3, 1, 4)], dim=2))
    prefill = grow.append("k", out, torch.zeros(2, 3, 7, 4))  # several tokens: a plain cat
    assert prefill.shape[2] == out.shape[2] + 7


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("policy,budget", [("quest", 24), ("tokenselect", 24), ("snapkv", 40), ("h2o", 40)])
def test_generation_with_spare_room_equals_cat(monkeypatch, policy, budget):
    model = tiny_llama()
    ids = torch.randint(3, 96, (2, 70), generator=torch.Generator().manual_seed(2))

    def generate():
        with ak.patch(model), torch.no_grad():
            cache = ak.KVCache(policy, budget=budget)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=12,
                                 do_sample=False)
            return out, cache.nbytes()

    monkeypatch.setattr(kvcache_grow, "MIN_SLOTS", 10**9)
    plain, plain_bytes = generate()
    monkeypatch.setattr(kvcache_grow, "MIN_SLOTS", 8)
    grown, grown_bytes = generate()
    assert torch.equal(plain, grown)
    assert plain_bytes <= grown_bytes <= plain_bytes * 2  # the spare room is allocated, and counted
