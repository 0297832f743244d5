"""``KVCache``: a compressed / selective ``transformers.Cache`` driven by a policy.

    cache = attnkit.KVCache(policy="snapkv", budget=256)       # tokens per KV head and layer
    with attnkit.patch(model):                                  # attnkit's attention function
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
    cache.kept_positions(0)   # (B, Hkv, kept) original positions held by layer 0

How it works (see docs/kv-cache.md):

- Storage per layer: keys/values (B, Hkv, L, D) and the original position of every slot
  (B, Hkv, L), ``-1`` for an empty slot. Heads may keep different numbers of tokens
  (per-head budgets are real): once they do, the layer holds each (row, KV head)'s own
  tokens in a ``RaggedKV`` (``attnkit.kvcache_ragged``, paged) and decodes with a segment
  softmax over it; ``layout="padded"`` keeps the padded layout. Padding tokens of a batch
  are empty slots. ``kv_bits=8`` (or 4) holds the kept tokens of that storage quantized
  (``attnkit.kvcache_quant``), from the first compression on.
- The cache needs attnkit's attention function (``attnkit.patch(model)``): transformers
  builds one mask per batch row for all heads, so only attnkit can attend over per-head
  sets. The attention function finds the cache layer from the key tensor the layer's
  ``update`` returned (``attnkit.cache_tag.cache_layer_of``), and calls ``layer.attention``
  (``KVCacheLayer``, in ``attnkit.kvcache_layer``).
- Prefill attends to the whole prompt (or the prefill method); the layer records the
  last ``window`` queries (the observation window) and, once the forward pass is over
  (at the layer's next ``update``, or when the cache is inspected), compresses to the
  budget: what decode sees is compressed, as in SnapKV and kvpress. A chunked prefill
  compresses after every chunk. With ``when="decode"``/``"both"`` the cache is
  compressed again every ``interval`` decode steps once a head holds more than the budget.
- Hybrid models (linear + softmax layers): a linear-attention layer gets a ``StateLayer``
  (``attnkit.kvcache_state``: its recurrent and short-convolution states, O(1) per token);
  MiniMax needs ``KVCache.for_model(model, ...)``; Kimi-Linear's MLA layers hold their
  latents (``KVCacheLayer._latent_attention``).
- Positions are never rewritten: keys keep the RoPE of their original positions, and
  ``get_seq_length`` counts tokens seen, so new tokens get the right positions.
"""

from __future__ import annotations

import functools
import importlib
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from transformers.cache_utils import Cache

from .kvcache_layer import KVCacheLayer
from .kvcache_quant import check_kv_bits
from .kvcache_state import StateLayer
from .methods.kvcache.base import WHEN, CachePolicy
from .registry import policy_class

__all__ = ["KVCache", "KVCacheLayer", "StateLayer", "generate_with_cache"]

LAYOUTS = ("auto", "ragged", "padded")


class KVCache(Cache):
    """A ``transformers.Cache`` that keeps a bounded, policy-chosen set of tokens.

    ``policy``: a registered KV-cache policy (``attnkit.methods(kind="cache")``);
    ``budget``: tokens kept per KV head and layer; ``ratio``: fraction of the prompt
    removed (kvpress's ``compression_ratio``: keep ``max(1, int(n * (1 - ratio)))``);
    exactly one of them (policies that evict nothing, e.g. query-aware selection, use
    ``budget`` as the tokens attended per step). ``when``: "prefill" (compress after each
    prefill chunk), "decode" (every ``interval`` decode steps) or "both"; default: the
    policy's. ``layout``: "auto" (per-head storage once heads keep different numbers of
    tokens), "ragged" (per-head storage after any compression) or "padded" (every head
    padded to the largest). ``kv_bits``: None (the model dtype), 8 or 4: the kept tokens are
    held quantized (per token and head, float32 scale) in the per-head storage from the
    first compression on (an evicting policy; not ``layout="padded"``). ``config``: the
    policy's config fields. Needs ``attnkit.patch(model)``.
    """

    def __init__(self, policy: str = "snapkv", budget: Optional[int] = None, ratio: Optional[float] = None,
                 when: Optional[str] = None, interval: int = 1, layout: str = "auto", kv_bits: Optional[int] = None,
                 **config: Any) -> None:
        Cache.__init__(self, layers=[])  # not super(): a model's own cache class may follow (for_model)
        cls = policy_class(policy)
        self.policy: CachePolicy = cls(**config)
        if budget is not None and ratio is not None:
            raise ValueError("pass either budget (tokens kept) or ratio (fraction removed), not both")
        if budget is None and ratio is None and self.policy.has_budget():
            raise ValueError(f"policy {policy!r} needs budget= (tokens kept per KV head and layer) "
                             "or ratio= (fraction of the prompt removed)")
        if not self.policy.has_budget() and (budget is not None or ratio is not None):
            raise ValueError(f"policy {policy!r} keeps every token and has no budget; pass neither budget nor ratio "
                             "(combine it with an evicting policy through policy='compose')")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"budget must be a positive int (tokens per KV head and layer), got {budget!r}")
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 <= ratio < 1):
            raise ValueError(f"ratio must be a float in [0, 1) (fraction removed), got {ratio!r}")
        when = when or self.policy.default_when
        if when not in WHEN:
            raise ValueError(f"when must be one of {WHEN}, got {when!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive int (decode steps), got {interval!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if budget is not None:
            self.policy.check_budget(budget, f"budget={budget}")
        self.kv_bits = _check_kv_bits(check_kv_bits(kv_bits), self.policy, layout)
        self.layout = "ragged" if self.kv_bits else layout  # quantized: per-head storage at any compression
        self.budget, self.ratio, self.when, self.interval = budget, ratio, when, interval

    @classmethod
    def for_model(cls, model: Any, *args: Any, **kwargs: Any) -> "KVCache":
        """``KVCache(*args, **kwargs)`` of the class ``model`` accepts: MiniMax's model takes
        only its own ``MiniMaxCache`` (an ``isinstance`` check), so it gets a ``KVCache``
        that is also one; any other model gets a plain ``KVCache``."""
        required = _required_cache_class(model)
        if required is None:
            return cls(*args, **kwargs)
        return _with_base(cls, required)(*args, **kwargs)

    def __repr__(self) -> str:
        amount = f"budget={self.budget}" if self.ratio is None else f"ratio={self.ratio}"
        bits = "" if self.kv_bits is None else f", kv_bits={self.kv_bits}"
        return f"KVCache(policy={self.policy.name!r}, {amount}, when={self.when!r}{bits}, {self.policy.config})"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return self._layer(layer_idx, KVCacheLayer).update(key_states, value_states)

    def _layer(self, idx: int, kind: type) -> Any:
        """Layer ``idx``, created on first use as ``kind``: ``KVCacheLayer`` for a softmax
        layer (``update``), ``StateLayer`` for a linear-attention layer of a hybrid model
        (its conv / recurrent states). Layers not reached yet are softmax placeholders,
        replaced while still empty if a linear layer turns out to sit there."""
        while len(self.layers) <= idx:
            self.layers.append(KVCacheLayer(self, len(self.layers)))
        layer = self.layers[idx]
        if not isinstance(layer, kind):
            if kind is KVCacheLayer or layer.is_initialized:
                raise ValueError(f"layer {idx} of attnkit.KVCache was used as a "
                                 f"{type(layer).__name__} and now as a {kind.__name__}")
            layer = self.layers[idx] = StateLayer(self, idx)
        return layer

    # --- linear-attention layers of hybrid models (transformers' layer-typed cache API) --

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> Optional[torch.Tensor]:
        self._layer(layer_idx, StateLayer)
        return super().get_conv_state(layer_idx, state_idx)

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          **kwargs: Any) -> torch.Tensor:
        return self._layer(layer_idx, StateLayer).update_conv_state(conv_states, state_idx, **kwargs)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> Optional[torch.Tensor]:
        self._layer(layer_idx, StateLayer)
        return super().get_recurrent_state(layer_idx, state_idx)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs: Any) -> torch.Tensor:
        return self._layer(layer_idx, StateLayer).update_recurrent_state(recurrent_states, state_idx, **kwargs)

    def get_linear_cache(self, layer_idx: int) -> Optional[torch.Tensor]:
        """MiniMax's lightning-attention state (B, H, D, D), or None before the first step."""
        return self.get_recurrent_state(layer_idx)

    def set_linear_cache(self, layer_idx: int, linear_cache: torch.Tensor) -> None:
        layer = self._layer(layer_idx, StateLayer)
        layer.update_recurrent_state(linear_cache)
        layer.has_previous_state[0] = True

    def budget_for(self, layer: KVCacheLayer) -> int:
        """Tokens per head this layer keeps (or attends to, for query-aware policies)."""
        if self.budget is not None:
            base = self.budget
        else:
            base = max(1, int(layer.seen * (1 - self.ratio)))
            self.policy.check_budget(base, f"ratio={self.ratio} of {layer.seen} tokens")
        return self.policy.layer_budget(base, layer.layer_idx, len(self.layers))

    def row_budgets(self, counts: torch.Tensor, layer: KVCacheLayer) -> torch.Tensor:
        """(B,) tokens per head kept in each batch row, from its number of real tokens."""
        if self.budget is not None:
            k = self.policy.layer_budget(self.budget, layer.layer_idx, len(self.layers))
            return torch.full_like(counts, k)
        kept = [max(1, int(int(n) * (1 - self.ratio))) for n in counts]
        for n, k in zip(counts.tolist(), kept):
            self.policy.check_budget(k, f"ratio={self.ratio} of {n} tokens")
        kept = [self.policy.layer_budget(k, layer.layer_idx, len(self.layers)) for k in kept]
        return torch.tensor(kept, dtype=torch.long, device=counts.device)

    # --- inspection --------------------------------------------------------------------

    def compress(self) -> None:
        """Run any compression scheduled by the last forward pass now (in inference mode
        when the cache was filled in inference mode: its tensors cannot be updated outside)."""
        for layer in self.layers:
            if not getattr(layer, "pending", False):
                continue
            ragged = getattr(layer, "ragged", None)
            held = [t for t in vars(layer).values() if torch.is_tensor(t)] + (ragged.tensors() if ragged else [])
            with torch.inference_mode(any(t.is_inference() for t in held) or torch.is_inference_mode_enabled()):
                layer.flush()

    def kept_positions(self, layer: int) -> torch.Tensor:
        """(B, Hkv, kept) LongTensor of the original token positions layer ``layer`` holds,
        sorted; heads that keep fewer tokens than the largest are padded with -1 (in this
        view only: ragged storage holds no padding)."""
        return self.layers[layer].kept_positions()

    def nbytes(self) -> int:
        """Bytes allocated now (``untyped_storage().nbytes()`` of the distinct tensors held):
        keys, values, slot positions (ragged pool and page tables) and policy state of every
        softmax layer, and the conv / recurrent states of every linear-attention layer."""
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes the keys and values of every token seen would take in the model's own
        full cache (a layer with its own sliding window holds only its window there too;
        a linear-attention layer holds its states in either)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, StateLayer):
                total += layer.nbytes()  # a linear layer's states: the same in any cache
            elif layer.is_initialized:
                tokens = layer.seen if layer.window is None else min(layer.seen, layer.window - 1)
                total += _full_kv_bytes(layer, tokens)
        return total

    def policy_layer_nbytes(self) -> tuple[int, int]:
        """(bytes held, bytes of the full cache) of the layers the policy compresses: the
        softmax layers without their own sliding window (Gemma 3's global layers; every
        layer of Llama). Window layers and linear layers hold the same in any cache."""
        held = full = 0
        for layer in self.layers:
            if isinstance(layer, KVCacheLayer) and layer.is_initialized and layer.window is None:
                held += layer.nbytes()
                full += _full_kv_bytes(layer, layer.seen)
        return held, full

    def stats(self) -> dict[str, Any]:
        """Policy, budget, kv_bits, tokens seen, tokens kept per layer, bytes held vs a full
        cache: of all layers (``nbytes``, ``full_nbytes``) and of the layers the policy
        compresses (``policy_layers_*``: on Gemma 3 its global layers)."""
        self.compress()
        kept = [int(layer.kept_counts().max()) if isinstance(layer, KVCacheLayer) and layer.is_initialized else 0
                for layer in self.layers]
        held, full = self.nbytes(), self.full_nbytes()
        policy_held, policy_full = self.policy_layer_nbytes()
        return {
            "policy": self.policy.name,
            "budget": self.budget,
            "ratio": self.ratio,
            "when": self.when,
            "kv_bits": self.kv_bits,
            "seen": self.get_seq_length(),
            "kept_per_layer": kept,
            "compressions": sum(layer.compressions for layer in self.layers),
            "nbytes": held,
            "full_nbytes": full,
            "compression": (full / held) if held else float("nan"),
            "policy_layers_nbytes": policy_held,
            "policy_layers_full_nbytes": policy_full,
        }


def _full_kv_bytes(layer: KVCacheLayer, tokens: int) -> int:
    """Bytes of ``tokens`` keys and values of ``layer`` in the model dtype, no slot positions."""
    b, h, d_k, d_v, size = layer.kv_dims
    return b * h * tokens * (d_k + d_v) * size


def _check_kv_bits(kv_bits: Optional[int], policy: CachePolicy, layout: str) -> Optional[int]:
    """``kv_bits`` if the policy's tokens can be held quantized (the per-head storage of an
    evicting policy), else a ValueError saying what to use instead."""
    if kv_bits is None:
        return None
    if layout == "padded":
        raise ValueError(f"kv_bits={kv_bits} holds the kept tokens in the per-head (ragged) storage: use "
                         "layout='auto' or layout='ragged' with it (layout='padded' holds the model dtype)")
    if policy.mode == "store":
        raise ValueError(f"kv_bits: policy {policy.name!r} stores its tokens itself (quantized or pruned); kv_bits "
                         "is for evicting policies (duo, snapkv, tova, adakv, pyramidkv, ...)")
    if not policy.evicts() or policy.accumulates() or policy.selects():
        why = "selects tokens per decode step" if policy.selects() else "accumulates attention per slot"
        raise ValueError(f"kv_bits: policy {policy.name!r} {why}, which needs the padded full-precision layout; "
                         "kv_bits is for policies that only evict (duo, snapkv, tova, adakv, pyramidkv, ...)")
    return kv_bits


def _required_cache_class(model: Any) -> Optional[type]:
    """The cache class a model's forward insists on (MiniMax's ``MiniMaxCache``), or None."""
    for module in model.modules():
        if type(module).__name__ == "MiniMaxLightningAttention":
            return getattr(importlib.import_module(type(module).__module__), "MiniMaxCache", None)
    return None


@functools.lru_cache(maxsize=None)
def _with_base(cls: type, required: type) -> type:
    """``cls`` that is also a ``required`` (for its model's isinstance check), behaving as
    ``cls`` throughout: ``required``'s own list of linear states is never used, the
    linear layers' states live in ``StateLayer``s (``get_linear_cache`` / ``set_linear_cache``)."""
    return type(f"{cls.__name__}As{required.__name__}", (cls, required), {
        "__doc__": f"attnkit.{cls.__name__} accepted where {required.__name__} is required.",
        "__len__": Cache.__len__,
        "batch_repeat_interleave": Cache.batch_repeat_interleave,
        "batch_select_indices": Cache.batch_select_indices,
        "crop": Cache.crop,
    })


@contextmanager
def generate_with_cache(model: Any, policy: str, budget: Optional[int] = None, ratio: Optional[float] = None,
                        **config: Any) -> Iterator[Any]:
    """Inside the block, ``model.generate(...)`` without ``past_key_values`` gets a fresh
    ``KVCache(policy, budget, ratio, **config)`` (for ``attnkit.patch(model, cache=...)``).

    The arguments are checked on entry; ``model.generate`` is restored on exit. The model
    must also run attnkit's attention (``attnkit.patch``).
    """
    KVCache(policy=policy, budget=budget, ratio=ratio, **config)  # errors now, not at generate
    had = "generate" in model.__dict__
    previous = model.__dict__.get("generate")

    def generate(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = KVCache.for_model(model, policy=policy, budget=budget, ratio=ratio, **config)
        inner = previous if previous is not None else type(model).generate.__get__(model)
        return inner(*args, **kwargs)

    object.__setattr__(model, "generate", generate)
    try:
        yield model
    finally:
        if had:
            object.__setattr__(model, "generate", previous)
        else:
            del model.__dict__["generate"]
