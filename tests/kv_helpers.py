"""Small-tensor harness shared by the KV-cache policy tests: inputs and one layer step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit.cache_tag import cache_layer_of
from attnkit.kvcache import KVCache
from attnkit.reference import reference_attention

B, HQ, HKV, N, D = 2, 4, 2, 40, 8
G = HQ // HKV
SCALE = 1 / math.sqrt(D)


def _qkv(n=N, b=B, seed=0):
    """q: (b, HQ, n, D), k, v: (b, HKV, n, D), float64."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, HQ, n, D, generator=gen, dtype=torch.float64)
    k = torch.randn(b, HKV, n, D, generator=gen, dtype=torch.float64)
    v = torch.randn(b, HKV, n, D, generator=gen, dtype=torch.float64)
    return q, k, v


def _step(cache: KVCache, q, k, v, mask=None, layer=0):
    """One forward of one layer as a model runs it: update, then attnkit's attention."""
    keys, values = cache.update(k, v, layer)
    cache_layer = cache_layer_of(keys)
    t = q.shape[2]

    def default():
        m = torch.ones(t, keys.shape[2], dtype=torch.bool).tril(keys.shape[2] - t)
        if mask is not None:
            m = (m & mask[:, 0, :, -keys.shape[2]:])[:, None]
        return F.scaled_dot_product_attention(q, keys.repeat_interleave(G, 1), values.repeat_interleave(G, 1),
                                              attn_mask=m, scale=SCALE)

    return cache_layer.attention(q, mask, SCALE, default)


def check_output(out, q1, k, v, sel):
    """out: (B, HQ, 1, D) equals attention of q1 over the slots ``sel`` (B, HKV, L) of k, v."""
    ref = reference_attention(q1, k, v, mask=sel.repeat_interleave(G, 1)[:, :, None], scale=SCALE)
    torch.testing.assert_close(out, ref)


def topk_mask(scores, k):
    """(..., L) bool: the ``k`` highest ``scores`` along the last dim."""
    idx = scores.topk(k, -1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)


def tiny_llama(heads: int, kv_heads: int, head_dim: int) -> torch.nn.Module:
    """A seeded 2-layer random Llama (vocabulary 128) with the given head layout, in eval mode."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=heads * head_dim, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(config).eval()
