"""attnkit.KVCache across architectures (tiny random models from tests/arch_zoo.py):
a budget at least the length equals the model's own attention (every policy on three
architectures, one of them with its own sliding window on every layer, one with window
and global layers; one policy of each mode on every decoder), and a layer with its own
sliding window holds only its window while the policy compresses the global layers."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import attnkit as ak  # noqa: E402
from arch_zoo import DECODERS, WINDOW  # noqa: E402
from attnkit import KVCache  # noqa: E402

POLICIES = [m.name for m in ak.methods(kind="cache")]
# Settings under which a policy keeps everything exactly (store-mode policies take no budget).
EXACT = {"quantized": {"bits": 8, "residual": 256}, "think": {"pruning_ratio": 0.0}}
NOT_EXACT = {"zipcache"}  # quantizes the prompt at any setting (checked in test_kvcache_store.py)
ONE_PER_MODE = ["snapkv", "quest", "quantized"]  # evict, select, store
PROMPT, NEW = 40, 5
_MODELS: dict[str, torch.nn.Module] = {}


def model_of(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        _MODELS[name] = next(a for a in DECODERS if a.name == name).build()
    return _MODELS[name]


def decode_logits(model: torch.nn.Module, cache=None) -> torch.Tensor:
    """(NEW, 1, V) logits of greedy decoding after a PROMPT-token prompt, under ak.patch."""
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if cache is not None:
        kwargs["past_key_values"] = cache
    with ak.patch(model), torch.no_grad():
        return torch.stack(model.generate(ids, **kwargs).logits)


def exact_cache(policy: str) -> KVCache:
    return KVCache(policy, **EXACT[policy]) if policy in EXACT else KVCache(policy, budget=1000)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3_text"])
@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in NOT_EXACT])
def test_every_policy_budget_above_length_is_exact(arch, policy):
    model = model_of(arch)
    torch.testing.assert_close(decode_logits(model, exact_cache(policy)), decode_logits(model), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", [a.name for a in DECODERS if a.name not in ("llama", "mistral", "gemma3_text")])
@pytest.mark.parametrize("policy", ONE_PER_MODE)
def test_one_policy_per_mode_is_exact_on_every_decoder(arch, policy):
    model = model_of(arch)
    torch.testing.assert_close(decode_logits(model, exact_cache(policy)), decode_logits(model), rtol=0, atol=1e-6)


def test_window_layers_hold_their_window_and_policies_compress_global_layers():
    model = model_of("gemma3_text")  # layer 0: window of WINDOW; layer 1: global
    cache = KVCache("snapkv", budget=16, window=4)
    decode_logits(model, cache)
    assert cache.layers[0].keys.shape[2] == WINDOW - 1  # all a later query can see
    assert cache.layers[0].kept_positions().tolist()[0][0] == list(range(PROMPT + NEW - WINDOW, PROMPT + NEW - 1))
    assert cache.layers[1].kept_positions().shape[-1] <= 16 + NEW
    full = KVCache("snapkv", budget=1000)
    decode_logits(model, full)
    assert cache.nbytes() < full.nbytes()


def test_policy_layer_bytes_count_only_the_global_layers():
    model = model_of("gemma3_text")  # layer 0: window of WINDOW; layer 1: global
    cache = KVCache("snapkv", budget=16, window=4)
    decode_logits(model, cache)
    stats = cache.stats()
    held, full = cache.policy_layer_nbytes()
    assert (stats["policy_layers_nbytes"], stats["policy_layers_full_nbytes"]) == (held, full)
    assert held == cache.layers[1].nbytes()  # the global layer alone, measured from its storages
    b, h, d_k, d_v, size = cache.layers[1].kv_dims
    assert full == b * h * (PROMPT + NEW - 1) * (d_k + d_v) * size  # every token the global layer saw
    window_full = stats["full_nbytes"] - full  # the window layer's share is the same in both caches
    assert window_full == b * h * (WINDOW - 1) * (d_k + d_v) * size
    assert held < full and stats["nbytes"] - held == cache.layers[0].nbytes()
