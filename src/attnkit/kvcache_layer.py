"""``KVCacheLayer``: one layer of an ``attnkit.KVCache`` — its slots, the attention over
them, and compression to the budget (see ``attnkit.kvcache`` for how the cache works).

Storage per layer: keys/values (B, Hkv, L, D) and the original position of every slot
(B, Hkv, L), ``-1`` for an empty slot. Once a compression leaves the heads with different
numbers of tokens (and the policy allows it, ``_ragged_ok``), the layer moves to a
``RaggedKV`` (``attnkit.kvcache_ragged``): each (row, KV head) holds exactly its own
tokens, ``keys`` / ``values`` / ``positions`` are then None and ``update`` returns only the
new tokens (tagged with the layer; attention reads the ragged storage). What the layer
asks of its policy is the contract of ``attnkit.methods.kvcache.base`` (``CachePolicy``,
``Store``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from transformers.cache_utils import CacheLayerMixin

from .cache_tag import tag_keys
from .kernels import attention_with_lse
from .kvcache_grow import Growing
from .kvcache_ragged import RaggedKV, RaggedView
from .kvcache_select import attend_selected
from .methods.kvcache.base import LayerView, Store, nbytes_of
from .methods.kvcache.common import window_probs


class KVCacheLayer(CacheLayerMixin):
    """One layer of a ``KVCache``. ``update`` and ``attention`` are called by the model.

    ``cache``: the ``KVCache`` that owns the layer (its policy, budget and schedule).
    Storage: a ``"store"`` policy's ``make_store(layer_idx)`` gives a ``Store`` that holds
    the tokens (``append`` in ``update``, ``load`` for the keys and values attended,
    ``observe`` at the end of every ``attention``); otherwise plain tensors.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: Any, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.grow = Growing()
        self.positions: Optional[torch.Tensor] = None  # (B, Hkv, L) long, -1 = empty
        self.state: dict[str, torch.Tensor] = {}  # per-slot policy state (B, Hkv, L)
        self.seen = 0
        self.plain = True  # storage is every token seen, in order (nothing compressed yet)
        self.obs_q: Optional[torch.Tensor] = None  # (B, Hq, W, D)
        self.obs_pos: Optional[torch.Tensor] = None  # (W,)
        self.scale = 1.0
        self.pending = False
        self.since = 0  # decode steps since the last compression
        self.compressions = 0
        self.budget_rows: Optional[torch.Tensor] = None  # (B,) fixed at the first compression
        self._awaiting_attention = False
        self._last_t = 0
        # Storage hook (quantized / pruned caches, see the class docstring): ``keys`` /
        # ``values`` are then the store's read-out, alive only from ``update`` to the end of
        # ``attention`` (so ``nbytes`` is the store's).
        self.store: Optional[Store] = cache.policy.make_store(layer_idx)
        # The layer's own sliding window (set by attnkit's attention function): such a layer
        # holds only the last window - 1 tokens (all a later query can see), and the
        # policy, which compresses the layers of full attention, leaves it alone.
        self.window: Optional[int] = None
        self.rope_theta: Optional[float] = None  # set by attnkit's attention from the module's config
        self.ragged: Optional[RaggedKV] = None  # per-head storage, once heads keep different counts
        self.latent = False  # an MLA layer (latents): never ragged

    # --- transformers' layer API ----------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.positions = torch.zeros(b, h, 0, dtype=torch.long, device=self.device)
        self.kv_dims = (b, h, d, value_states.shape[-1], key_states.element_size())
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append T new tokens (B, Hkv, T, D); return the K/V this step attends to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._awaiting_attention:
            raise RuntimeError(
                "attnkit.KVCache needs attnkit's attention function, but the last forward pass did not use "
                "it: run the model inside `with attnkit.patch(model):` (or attnkit.apply(model, ...))")
        self.flush()
        t = key_states.shape[2]
        b, h = key_states.shape[:2]
        if self.ragged is not None:
            self.ragged.append(key_states, value_states, torch.arange(self.seen, self.seen + t, device=self.device))
            self.seen += t
            self._last_t = t
            self._awaiting_attention = True
            return tag_keys(key_states, self), value_states  # only the new tokens: attention reads self.ragged
        new_pos = torch.arange(self.seen, self.seen + t, device=self.device).view(1, 1, t).expand(b, h, t)
        if self.store is not None:
            self.store.append(key_states, value_states)
            self.keys, self.values = self.store.load()
        else:  # decode steps of a long cache write into spare room (kvcache_grow)
            self.keys = self.grow.append("keys", self.keys, key_states)
            self.values = self.grow.append("values", self.values, value_states)
        self.positions = self.grow.append("positions", self.positions, new_pos)
        for name, tensor in self.state.items():
            self.state[name] = self.grow.append("state:" + name, tensor, tensor.new_zeros(tensor.shape[:2] + (t,)))
        self.seen += t
        self._last_t = t
        self._awaiting_attention = True
        return tag_keys(self.keys, self), self.values

    def get_seq_length(self) -> int:
        """Tokens seen (RoPE positions of new tokens are derived from it)."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): the slots held plus the new tokens; bottom-right aligned.

        Only the columns of the new tokens (their padding and causality) are read by
        ``attention`` once the cache is compressed; the held slots use their own validity.
        """
        held = self._held()
        return held + query_length, self.seen - held

    def _held(self) -> int:
        """Slots per head held (the longest head's, in ragged storage)."""
        if self.ragged is not None:
            return self.ragged.max_length()
        return 0 if self.positions is None else self.positions.shape[2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.cache, self.layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._apply_batch(lambda x: x[indices.to(x.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._apply_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("attnkit.KVCache cannot be cropped (compressed tokens cannot be restored)")

    def _apply_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.ragged is not None:
            self.ragged = self.ragged.apply_batch(fn)
        elif self.store is not None:
            self.store.apply_batch(fn)
            self.keys = self.values = None
        else:
            self.keys, self.values = fn(self.keys), fn(self.values)
        self.positions = fn(self.positions) if self.positions is not None else None
        self.state = {n: fn(t) for n, t in self.state.items()}
        if self.obs_q is not None:
            self.obs_q = fn(self.obs_q)
        if self.budget_rows is not None:
            self.budget_rows = fn(self.budget_rows)

    # --- attention, called by attnkit's attention function ------------------------

    def attention(self, q: torch.Tensor, mask: Optional[torch.Tensor], scale: Optional[float],
                  default: Callable[[], torch.Tensor],
                  expanded: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Attention of q: (B, Hq, T, D) over this layer's slots -> (B, Hq, T, D).

        ``default`` computes it the ordinary way (transformers' mask, prefill method);
        it is used while the storage is plain (nothing compressed, all heads alike) and
        the policy needs nothing special from the step.
        """
        if expanded is not None:
            return self._latent_attention(q, mask, scale, default, *expanded)
        self._awaiting_attention = False
        policy = self.cache.policy
        t = q.shape[2]
        self.scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
        self._mark_padding(mask, t)
        if self.window is not None and self.store is None:
            out = default()  # the model's own window (in transformers' mask): exact over the held slots
            self._keep_window()
            return out
        decode = t == 1
        special = decode and (policy.accumulates() or policy.selects())
        if self.plain and not special:
            out = default()
        else:
            out = self._attend(q, mask, special)
        if t > 1 and policy.accumulates():
            self._accumulate_prefill(q, t)
        self._observe(q, t)
        self._schedule(t)
        if self.store is not None:
            self.store.observe(self.view(), q, torch.arange(self.seen - t, self.seen, device=q.device))
            self.keys = self.values = None  # drop the dequantized read-out
        return out

    def _latent_attention(self, q: torch.Tensor, mask: Optional[torch.Tensor], scale: Optional[float],
                          default: Callable[[], torch.Tensor], keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """MLA (Kimi-Linear): the layer holds latents (B, 1, L, r), (B, 1, L, r_rope), which
        the model expands after the cache into keys (B, H, L, Dk) and values (B, H, L, Dv).
        Attention and the policy's choice run on those (every head sees the same slots);
        a slot is kept where most heads keep it (top ``budget`` by votes, later first on
        ties) and the latents are compressed at once: the expanded K/V are never kept."""
        policy = self.cache.policy
        if policy.accumulates() or policy.selects() or self.store is not None:
            raise ValueError(f"attnkit.KVCache policy {policy.name!r} on an MLA layer (compressed latents, "
                             "Kimi-Linear): only policies that choose the tokens from the observed queries "
                             "(snapkv, pyramidkv, streaming, ...) run there")
        self._awaiting_attention = False
        self.latent = True
        t = q.shape[2]
        self.scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
        self._mark_padding(mask, t)
        latents = self.keys, self.values, self.positions
        self.keys, self.values = keys, values
        self.positions = latents[2].expand(-1, keys.shape[1], -1)
        keep = None
        try:
            out = default() if self.plain else self._attend(q, mask, False)
            self._observe(q, t)
            self._schedule(t)
            if self.pending:
                self.pending = False
                keep = self._choose()
        finally:
            self.keys, self.values, self.positions = latents
        if keep is not None:
            self._apply_keep(self._vote(keep))
        return out

    def _vote(self, keep: torch.Tensor) -> torch.Tensor:
        """(B, H, L) per-head choice -> (B, 1, L): each row's budget of slots most heads keep."""
        valid = self.positions >= 0
        length = keep.shape[-1]
        score = keep.sum(dim=1, keepdim=True) * (length + 1) + torch.arange(length, device=keep.device)
        score = score.masked_fill(~valid, -1)
        k = min(int(self.budget_rows.max()), length)
        top = score.topk(k, dim=-1)
        chosen = torch.arange(k, device=keep.device) < self.budget_rows.view(-1, 1, 1)
        out = torch.zeros_like(valid).scatter(-1, top.indices, chosen & (top.values >= 0))
        return out & valid

    def _keep_window(self) -> None:
        """Drop the slots no later query can see: keep the last ``window - 1`` (plain,
        in-order storage; a query at position p sees keys p - window < j <= p)."""
        extra = self.positions.shape[2] - (self.window - 1)
        if extra > 0:
            self.keys, self.values = self.keys[:, :, extra:], self.values[:, :, extra:]
            self.positions = self.positions[:, :, extra:]
            self.state = {n: s[..., extra:] for n, s in self.state.items()}

    def _accumulate_prefill(self, q: torch.Tensor, t: int) -> None:
        """Accumulating policies (H2O, ...) start from the attention of the chunk's last
        ``window`` queries: O(window x L), not the full T x L attention."""
        w = min(t, self.cache.policy.obs_window() or t)
        view = self.view()
        view.queries, view.query_positions = q[:, :, -w:], torch.arange(self.seen - w, self.seen, device=q.device)
        self.cache.policy.accumulate(view, window_probs(view), view.query_positions)

    def _mark_padding(self, mask: Optional[torch.Tensor], t: int) -> None:
        """New tokens that no query may see (padding) become empty slots."""
        if mask is None or mask.dtype != torch.bool or mask.dim() != 4:
            return
        seen_by_any = mask[:, 0, :, -t:].any(dim=1)  # (B or 1, T)
        if bool(seen_by_any.all()):
            return
        if self.ragged is not None:
            self.ragged.mark_empty(~seen_by_any.expand(self.ragged.batch, t))
            return
        tail = self.positions[:, :, -t:]
        self.positions[:, :, -t:] = tail.masked_fill(~seen_by_any[:, None, :].expand_as(tail), -1)

    def _attend(self, q: torch.Tensor, mask: Optional[torch.Tensor], special: bool) -> torch.Tensor:
        if self.ragged is not None:  # segment softmax over each head's own tokens (causal by position)
            return self.ragged.attend(q, self.scale, self.seen - q.shape[2])[0]
        b, hq, t, d = q.shape
        hkv, length = self.keys.shape[1], self.keys.shape[2]
        g = hq // hkv
        allowed = (self.positions >= 0)[:, :, None, :].expand(b, hkv, t, length)
        if t > 1:
            allowed = allowed.clone()
            causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
            if mask is not None and mask.dtype == torch.bool and mask.dim() == 4:
                causal = causal & mask[:, 0, :, -t:]
                causal = causal[:, None]
            allowed[..., length - t:] = allowed[..., length - t:] & causal
        policy = self.cache.policy
        if special and policy.selects():
            chosen = policy.decode_select(self.view(), q, self.cache.budget_for(self))
            if chosen is not None and t == 1 and not policy.accumulates():  # gather the chosen slots only
                return attend_selected(q, self.keys, self.values, chosen & (self.positions >= 0), self.scale)
            if chosen is not None:
                allowed = allowed & chosen[:, :, None, :]
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # rows with no key: padding queries
        qg = q.reshape(b, hkv, g * t, d)
        if t > 1:
            allowed = allowed[:, :, None].expand(b, hkv, g, t, length).reshape(b, hkv, g * t, length)
        if special and policy.accumulates():
            logits = torch.matmul(qg, self.keys.transpose(2, 3)) * self.scale
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1, dtype=torch.float32)
            out = torch.matmul(probs.to(self.values.dtype), self.values)
            qpos = torch.arange(self.seen - t, self.seen, device=q.device)
            policy.accumulate(self.view(), probs.view(b, hq, t, length), qpos)
        else:
            out, _ = attention_with_lse(qg, self.keys, self.values, self.scale, mask=allowed)
        return out.reshape(b, hq, t, -1)

    def _observe(self, q: torch.Tensor, t: int) -> None:
        w = self.cache.policy.obs_window()
        if w <= 0:
            return
        qpos = torch.arange(self.seen - t, self.seen, device=q.device)
        if self.obs_q is None or t >= w:
            self.obs_q, self.obs_pos = q[:, :, -w:].detach().clone(), qpos[-w:].clone()
        else:
            old = max(self.obs_q.shape[2] + t - w, 0)  # drop the oldest first: no storage beyond w queries
            self.obs_q = torch.cat([self.obs_q[:, :, old:], q], dim=2)
            self.obs_pos = torch.cat([self.obs_pos[old:], qpos])

    def _schedule(self, t: int) -> None:
        when = self.cache.when
        policy = self.cache.policy
        if not policy.evicts() or self.cache.budget is None and self.cache.ratio is None:
            return
        if t > 1:
            self.pending = when in ("prefill", "both") or self.pending
        else:
            self.since += 1
            if when in ("decode", "both") and self.since >= self.cache.interval:
                self.pending = True

    # --- compression -----------------------------------------------------------------

    def view(self) -> LayerView:
        """What the policy sees (a ``RaggedView`` in ragged storage: padded positions, keys
        built only if read)."""
        common = dict(queries=self.obs_q, query_positions=self.obs_pos, scale=self.scale, layer_idx=self.layer_idx,
                      num_layers=len(self.cache.layers), seen=self.seen, state=self.state,
                      phase="prefill" if self._last_t > 1 else "decode", rope_theta=self.rope_theta)
        if self.ragged is not None:
            return RaggedView(self.ragged, positions=self.ragged.positions(), **common)
        return LayerView(keys=self.keys, values=self.values, positions=self.positions, **common)

    def flush(self) -> None:
        """Run a scheduled compression now."""
        if self.pending:
            self.pending = False
            self.compress()

    def compress(self) -> None:
        """Keep each head's budget of slots, chosen by the policy."""
        keep = self._choose()
        if keep is not None:
            self._apply_keep(keep)

    def _apply_keep(self, keep: torch.Tensor) -> None:
        self._gather(keep)
        self.plain = False
        self.since = 0
        self.compressions += 1

    def _choose(self) -> Optional[torch.Tensor]:
        """(B, Hkv, L) the slots the policy keeps, or None when nothing is to be evicted."""
        if self._held() == 0 or self.ragged is None and self.keys is None:
            return None
        policy = self.cache.policy
        view = self.view()
        counts = view.valid.sum(dim=-1)  # (B, Hkv)
        if self.budget_rows is None:
            self.budget_rows = self.cache.row_budgets(counts.max(dim=1).values, self)
        budget = self.budget_rows
        if bool((counts <= budget[:, None]).all()):  # nothing to evict: exact, or quantized (kv_bits)
            return view.valid if self.cache.kv_bits and self.ragged is None and self._ragged_ok() else None
        view.budget = int(budget.max())
        return policy.keep(view, budget)

    def _ragged_ok(self) -> bool:
        """Ragged storage is used for policies that only evict (their choice needs no
        per-slot state, no per-step attention rows or selections), on full-attention layers
        of tokens (not a store's, an MLA layer's latents or a sliding-window layer)."""
        policy = self.cache.policy
        return (self.cache.layout != "padded" and self.store is None and self.window is None and not self.latent
                and not self.state and policy.evicts() and not policy.accumulates() and not policy.selects())

    def _gather(self, keep: torch.Tensor) -> None:
        """Keep the ``keep`` slots (B, Hkv, L), in position order: ragged (each head its own
        count) when allowed and the counts differ (or ``layout="ragged"``), else padded to
        the largest head."""
        if self.ragged is not None:
            self.ragged.compact(keep)
            return
        counts = keep.sum(dim=-1)
        if self._ragged_ok() and (self.cache.layout == "ragged" or bool((counts != counts.max()).any())):
            self.ragged = RaggedKV.from_padded(self.keys, self.values, self.positions, keep, bits=self.cache.kv_bits)
            self.keys = self.values = self.positions = None
            return
        length = keep.shape[-1]
        slot = torch.arange(length, device=keep.device).expand_as(keep)
        order = torch.where(keep, slot, slot + length).argsort(dim=-1)
        width = int(keep.sum(dim=-1).max())
        idx = order[..., :width]
        kept = keep.gather(-1, idx)
        d_k, d_v = self.keys.shape[-1], self.values.shape[-1]
        self.keys = self.keys.gather(2, idx[..., None].expand(*idx.shape, d_k)).contiguous()
        self.values = self.values.gather(2, idx[..., None].expand(*idx.shape, d_v)).contiguous()
        self.positions = self.positions.gather(-1, idx).masked_fill(~kept, -1)
        self.state = {n: s.gather(-1, idx) for n, s in self.state.items()}

    # --- inspection --------------------------------------------------------------------

    def kept_positions(self) -> torch.Tensor:
        """(B, Hkv, kept) long: original positions held, sorted; -1 pads smaller heads."""
        self.flush()
        pos = self.ragged.positions() if self.ragged is not None else self.positions
        key = torch.where(pos >= 0, pos, torch.iinfo(torch.long).max)
        out = key.sort(dim=-1).values
        width = int((pos >= 0).sum(dim=-1).max()) if pos.numel() else 0
        out = out[..., :width]
        return out.masked_fill(out == torch.iinfo(torch.long).max, -1)

    def kept_counts(self) -> torch.Tensor:
        """(B, Hkv) long: tokens each head holds now."""
        self.flush()
        if self.ragged is not None:
            return self.ragged.counts()
        return (self.positions >= 0).sum(dim=-1)

    def nbytes(self) -> int:
        """Bytes allocated (distinct storages): keys, values, slot positions (or the ragged
        pool and its page tables), policy state, observation queries, and the store's."""
        self.flush()
        tensors = [self.positions, *self.state.values(), self.obs_q, self.obs_pos,
                   *self.cache.policy.held_tensors(self.layer_idx)]
        if self.ragged is not None:
            tensors += self.ragged.tensors()
        elif self.store is None:
            tensors += [self.keys, self.values]
        return nbytes_of(tensors) + (self.store.nbytes() if self.store is not None else 0)
