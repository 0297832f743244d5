"""``attnkit.KVCache`` on transformers' hybrid models (linear + softmax layers): the softmax
layers get the policy, the linear layers keep their recurrent and short-convolution
states (``StateLayer``, O(1) per token); ``patch(model, cache=...)`` runs them. Kimi-Linear's
softmax layers are MLA: the cache holds their latents, chosen on the expanded keys."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.kvcache import KVCacheLayer, StateLayer

pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
pytest.importorskip("transformers.models.minimax.modeling_minimax")
pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")

from test_hybrid_patch import (  # noqa: E402
    tiny_kimi_linear,
    tiny_minimax,
    tiny_olmo_hybrid,
    tiny_qwen3_5,
    tiny_qwen3_next,
)

BUILDERS = {"qwen3_next": tiny_qwen3_next, "qwen3_5": tiny_qwen3_5, "minimax": tiny_minimax,
            "kimi_linear": tiny_kimi_linear, "olmo_hybrid": tiny_olmo_hybrid}
BUDGET = 16


@pytest.fixture(params=sorted(BUILDERS))
def build(request):
    return BUILDERS[request.param]


def prompt(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def storage_bytes(cache) -> int:
    """Sum of the storage sizes of every distinct tensor the cache's layers hold."""
    seen: dict[int, int] = {}
    for layer in cache.layers:
        if isinstance(layer, StateLayer):
            tensors = layer.tensors()
        else:
            tensors = [layer.keys, layer.values, layer.positions, layer.obs_q, *layer.state.values()]
            tensors += layer.ragged.tensors() if layer.ragged is not None else []  # per-head storage
        for t in tensors:
            if t is not None:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def state_bytes(cache) -> list[int]:
    return [layer.nbytes() for layer in cache.layers if isinstance(layer, StateLayer)]


@torch.no_grad()
def generate(model, ids, cache=None, mask=None, new=8):
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def test_budget_above_prompt_equals_transformers_cache(build):
    model = build()
    ids = prompt(40)
    ref_tokens, ref_logits = generate(model, ids)  # transformers' own hybrid cache
    with ak.patch(model):
        cache = ak.KVCache.for_model(model, policy="snapkv", budget=1000)
        tokens, logits = generate(model, ids, cache)
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max() < 1e-4
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [StateLayer, KVCacheLayer, StateLayer, KVCacheLayer]
    assert cache.get_seq_length() == tokens.shape[1] - 1


@torch.no_grad()
def test_small_budget_bounds_softmax_layers_and_linear_states_are_constant(build):
    model = build()
    held = {}
    with ak.patch(model):
        for n in (64, 256):
            cache = ak.KVCache.for_model(model, policy="snapkv", budget=BUDGET, window=8)
            model(prompt(n), past_key_values=cache, use_cache=True)
            stats = cache.stats()  # compresses what the prefill scheduled
            softmax = [k for layer, k in zip(cache.layers, stats["kept_per_layer"]) if isinstance(layer, KVCacheLayer)]
            assert softmax and all(k <= BUDGET for k in softmax)
            for layer in cache.layers:
                if isinstance(layer, KVCacheLayer):
                    kept = layer.kept_positions()
                    assert kept.shape[-1] <= BUDGET
                    assert set(range(n - 8, n)) <= set(kept[0, 0].tolist())  # SnapKV's observation window
            held[n] = state_bytes(cache)
            assert all(b > 0 for b in held[n])
            assert abs(cache.nbytes() - storage_bytes(cache)) <= 0.1 * storage_bytes(cache)
        assert held[64] == held[256]  # O(1): the states do not grow with the prompt
        tokens, _ = generate(model, prompt(64), ak.KVCache.for_model(model, policy="snapkv", budget=BUDGET, window=8))
    assert tokens.shape == (1, 72)


@torch.no_grad()
def test_patch_with_cache_runs_a_left_padded_batch(build):
    """Nothing evicted: each step's logits equal one forward over the generated sequence.
    (Compared with that forward, not with transformers' cache: MiniMax's own MiniMaxCache
    sizes the decode mask from its first layer, a linear one that holds no tokens, so its
    padded row attends to its padding — off by 4e-3 here; attnkit's cache is not.)"""
    model = build()
    ids = prompt(48, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    ids[1, :11] = 0
    with ak.patch(model, cache="snapkv", budget=1000):
        tokens, logits = generate(model, ids, mask=mask)
    full_mask = torch.cat([mask, torch.ones(2, tokens.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
    full = model(tokens[:, :-1], attention_mask=full_mask[:, :-1]).logits[:, ids.shape[1] - 1:]
    assert (logits.transpose(0, 1) - full).abs().max() < 1e-4
    if build is not tiny_minimax:
        assert torch.equal(tokens, generate(model, ids, mask=mask)[0])  # transformers' own cache
    with ak.patch(model, cache="snapkv", budget=BUDGET, window=8):
        tokens, _ = generate(model, ids, mask=mask)
    assert tokens.shape == (2, 56)


@torch.no_grad()
def test_beam_search_reorders_both_kinds_of_layer(build):
    """Beam search reorders the softmax slots and the linear states alike."""
    model = build()
    ids = prompt(30)
    ref = model.generate(ids, max_new_tokens=6, num_beams=2, do_sample=False)
    with ak.patch(model, cache="snapkv", budget=500):
        out = model.generate(ids, max_new_tokens=6, num_beams=2, do_sample=False)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_evicted_decode_equals_a_forward_masked_to_the_kept_tokens(build):
    """After StreamingLLM eviction, a decode step equals one forward over prompt + token in
    which the softmax layers' last row sees only the kept positions and itself (the
    linear layers see everything, through their state)."""
    model = build()
    n, ids, nxt = 64, prompt(64), torch.tensor([[7]])
    with ak.patch(model):
        cache = ak.KVCache.for_model(model, policy="streaming", budget=12, sink=4)
        model(ids, past_key_values=cache, use_cache=True)
        kept = cache.kept_positions(1)[0, 0]
        assert kept.tolist() == [0, 1, 2, 3, *range(56, 64)]
        out = model(nxt, past_key_values=cache, use_cache=True).logits[0, -1]
        allowed = torch.ones(n + 1, n + 1, dtype=torch.bool).tril()
        allowed[n] = False
        allowed[n, kept] = True
        allowed[n, n] = True
        masks = {"full_attention": allowed[None, None], "linear_attention": None}
        full = model(torch.cat([ids, nxt], dim=1), attention_mask=masks).logits[0, -1]
    assert (out - full).abs().max() < 1e-4


def test_kimi_linear_mla_caches_latents_and_refuses_accumulating_policies():
    """Kimi-Linear's MLA layers: the cache holds the compressed latents (one "head"), and
    a policy that accumulates attention while decoding is refused with the reason."""
    model = tiny_kimi_linear()
    with ak.patch(model), torch.no_grad():
        cache = ak.KVCache(policy="snapkv", budget=BUDGET, window=8)
        model(prompt(64), past_key_values=cache, use_cache=True)
        assert cache.kept_positions(1).shape == (1, 1, BUDGET)
        assert cache.layers[1].keys.shape == (1, 1, BUDGET, model.config.kv_lora_rank)
        with pytest.raises(ValueError, match="policy 'h2o' on an MLA layer"):
            model(prompt(32), past_key_values=ak.KVCache(policy="h2o", budget=BUDGET), use_cache=True)


def test_other_recurrent_layers_refused_naming_them():
    """A hybrid whose recurrent layers attnkit does not know (Jamba's Mamba) is refused."""
    transformers = pytest.importorskip("transformers")
    config = transformers.JambaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2,
                                      attn_layer_offset=1, num_experts=1, mamba_d_state=4, mamba_expand=1,
                                      mamba_dt_rank=8, use_mamba_kernels=False)
    model = transformers.JambaForCausalLM(config)
    with pytest.raises(ValueError, match=r"cache='snapkv': JambaForCausalLM has recurrent layers .*JambaMambaMixer"):
        with ak.patch(model, cache="snapkv", budget=64):
            pass
    assert not hasattr(model, "attnkit_assignment")


def test_plain_kvcache_on_a_minimax_model_is_refused_by_minimax():
    """MiniMax's model accepts only a MiniMaxCache: ``KVCache.for_model`` gives one."""
    model = tiny_minimax()
    assert isinstance(ak.KVCache.for_model(model, policy="snapkv", budget=64),
                      __import__("transformers").models.minimax.modeling_minimax.MiniMaxCache)
    with ak.patch(model), pytest.raises(ValueError, match="MiniMax uses cache of its own"):
        model(prompt(8), past_key_values=ak.KVCache(policy="snapkv", budget=64), use_cache=True)
