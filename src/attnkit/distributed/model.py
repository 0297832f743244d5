"""Context parallel at the model level: a transformers causal LM's prefill with the
sequence sharded across the ranks of a process group, and decoding over a sharded cache.

    with ak.patch(model, context_parallel=group):            # zigzag ring by default
        ids, pos = akd.shard_inputs(input_ids, group)         # (B, n) each, this rank's shard
        logits = model(input_ids=ids, position_ids=pos).logits            # (B, n, V)
        full = akd.unshard(logits, group, total_len=input_ids.shape[1], dim=1)  # (B, N, V)
        tokens = model.generate(input_ids, max_new_tokens=32)  # greedy, sharded KV cache

Each rank runs the whole model on its shard with the shard's global ``position_ids`` (so
RoPE is that of one process); every attention layer runs ``ring_attention`` over the
shards (``ContextParallel.attention``). ``generate`` prefills into a ``ShardedKVCache``
and decodes: every rank runs the same new token, attends over the K/V it holds (out and
log-sum-exp), the partials are all-gathered and merged with ``merge_partials``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from .. import api, hybrid, model_layers
from ..kernels.exact import attention_with_lse
from ..kernels.merge import merge_partials
from .ring import ring_attention
from .sharded_cache import ShardedKVCache, decode_tag
from .sharding import LAYOUTS, check_same_length, positions, shard

__all__ = ["ContextParallel", "generate", "prepare", "shard_inputs", "unsupported_reason"]


def shard_inputs(input_ids: torch.Tensor, group: Any = None, layout: str = "zigzag",
                 attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of a prompt and its global positions.

    input_ids: (B, N), the same full prompt on every rank. Returns ids (B, n) and
    position_ids (B, n) int64, n = ``padded_len(N, R, layout) // R``: the positions of
    ``positions(rank, R, N, layout)``; positions >= N are padding (token id 0), which no
    real position attends under causal attention. Gather the logits (B, n, V) back with
    ``unshard(logits, group, layout, total_len=N, dim=1)``. A padding ``attention_mask``
    (a 0 anywhere) is refused: rows of a batch must be equally long.
    """
    check_no_padding(attention_mask)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, N), got shape {tuple(input_ids.shape)}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    ids = shard(input_ids, group, layout, dim=1)
    pos = positions(rank, world, input_ids.shape[1], layout).to(input_ids.device)
    return ids, pos.unsqueeze(0).expand(input_ids.shape[0], -1)


def check_no_padding(attention_mask: Optional[torch.Tensor]) -> None:
    """Refuse a padding mask: context parallel runs batches of equal-length rows only."""
    if attention_mask is not None and not bool((attention_mask != 0).all()):
        raise ValueError("context parallel does not run padded batches (attention_mask has zeros): pass rows of "
                         "equal length without padding, or run the rows one at a time (batch size 1)")


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why the model's attention cannot run as a context-parallel ring, or None.

    Supported: decoder-only causal LMs whose every attention layer is causal softmax
    attention over all earlier positions (Llama, Qwen2/3 without sliding windows, ...)."""
    reason = model_layers.unsupported_reason(model) or model_layers.exact_only_reason(model)
    if reason is not None:
        return reason
    if model_layers.softcap_of(model) is not None:
        return "its attention soft-caps the logits (Gemma 2), which the ring's kernel does not apply"
    if getattr(model.config, "is_encoder_decoder", False) or model_layers.cross_attention_modules(model):
        return "it is an encoder-decoder model (cross-attention)"
    if hybrid.hybrid_layers(model):
        return "it has linear-attention layers (hybrid model); run them with attnkit.distributed.lasp2"
    for idx, group in sorted(model_layers.attention_modules(model).items()):
        for module in group:
            window = model_layers.own_window(module)
            if window is not None:
                return f"layer {idx} has its own sliding window of {window} (Mistral / Gemma style)"
            if getattr(module, "is_causal", True) is False:
                return f"layer {idx} attends bidirectionally (an encoder), the ring runs causal decoders only"
    return None


def _check_method(spec: Any) -> None:
    """A layer's prefill method must run in the ring: exact, or a static pattern (mask_mod)."""
    if spec is None or spec.name == "full":
        return
    if not hasattr(api.get(spec.name, **spec.config), "mask_mod"):
        raise ValueError(f"method {spec.name!r} cannot run in the context-parallel ring (it is not a static pattern "
                         "with a mask_mod); use prefill=None ('full') or a static method such as 'sliding_window' "
                         "or 'streaming'")


@dataclass(frozen=True, eq=False)
class ContextParallel:
    """What a patched attention layer runs under context parallel: the ring over ``group``
    (None: the default group) with ``layout`` at prefill, the log-sum-exp merge at decode."""

    group: Any
    layout: str

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: Optional[float],
                  spec: Any) -> torch.Tensor:
        """query: (B, Hq, T, D); key, value: (B, Hkv, L, D) from the layer (RoPE applied,
        GQA not repeated). Untagged keys are this rank's prefill shard (T = L = n): the
        ring. Keys from a ``ShardedKVCache`` decode step are this rank's slots: partial
        attention, gathered and merged. Returns (B, Hq, T, D), this rank's rows."""
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        tag = decode_tag(key)
        if tag is None:
            method = "full" if spec is None else spec.name
            config = {} if spec is None else dict(spec.config)
            return ring_attention(query, key, value, self.group, method=method, causal=True, layout=self.layout,
                                  scale=scale, **config)
        return self._decode(query, key, value, scale, tag.owner)

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, owner: bool) -> torch.Tensor:
        """Every rank's partial (out, lse) over its slots, merged in rank order (the same
        result on every rank). The new tokens (the last T slots of the owner) attend
        causally among themselves."""
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        if k.shape[2] == 0:
            out = q.new_zeros(*q.shape[:3], v.shape[-1])
            lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        else:
            out, lse = attention_with_lse(q, k, v, scale, causal=owner and q.shape[2] > 1)
        packet = torch.cat([out.to(acc), lse.to(acc).unsqueeze(-1)], dim=-1).contiguous()
        parts = [torch.empty_like(packet) for _ in range(self.world)]
        dist.all_gather(parts, packet, group=self.group)
        merged, _ = merge_partials([(p[..., :-1], p[..., -1]) for p in parts])
        return merged.to(q.dtype)


def prepare(model: torch.nn.Module, group: Any, layout: str, specs: Iterable[Any], cache: Optional[str]) -> ContextParallel:
    """Check everything ``patch(model, context_parallel=group)`` needs, before it changes
    anything: an initialised group, a layout, a supported architecture, ring methods."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("context_parallel needs an initialised torch.distributed process group: call "
                         "torch.distributed.init_process_group first (torchrun sets the rank and world size)")
    if group is True:
        group = None  # the default group
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"context_parallel must be a torch.distributed ProcessGroup or True (the default group), "
                        f"got {type(group).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"context_parallel_layout must be one of {LAYOUTS}, got {layout!r}")
    if cache is not None:
        raise ValueError(f"cache={cache!r} cannot be combined with context_parallel: the context-parallel cache is "
                         "the sharded exact cache (ShardedKVCache)")
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"{type(model).__name__} cannot run context parallel: {reason}")
    for spec in specs:
        _check_method(spec)
    return ContextParallel(group, layout)


def check_call(cp: ContextParallel, kwargs: dict[str, Any]) -> None:
    """A forward of a context-parallel model: no padding mask, and the global positions
    of the shard (``shard_inputs``) unless a ``ShardedKVCache`` past its prefill supplies
    them. Collective (one all-reduce of two flags): a shard with padding on one rank is
    an error on every rank, not a hang in the ring."""
    mask, cache = kwargs.get("attention_mask"), kwargs.get("past_key_values")
    padded = mask is not None and not bool((mask != 0).all())
    positioned = kwargs.get("position_ids") is not None or (isinstance(cache, ShardedKVCache)
                                                            and cache.get_seq_length() > 0)
    flags = torch.tensor([padded, not positioned], dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=cp.group)
    if flags[0]:
        check_no_padding(torch.zeros(1))
    if flags[1]:
        raise ValueError("a context-parallel forward needs position_ids, the global positions of this rank's shard "
                         "(ids, position_ids = attnkit.distributed.shard_inputs(input_ids, group))")


GENERATE_ARGS = frozenset({"attention_mask", "max_new_tokens", "do_sample", "num_beams", "eos_token_id",
                           "pad_token_id", "use_cache"})


def generate(model: torch.nn.Module, cp: ContextParallel, input_ids: torch.Tensor,
             max_new_tokens: Optional[int] = None, **kwargs: Any) -> torch.Tensor:
    """Greedy decoding with a sharded prefill and cache (what ``model.generate`` runs
    inside ``patch(model, context_parallel=group)``).

    input_ids: (B, N), the same full prompt on every rank. Returns (B, N + new) int64 on
    every rank: the tokens ``model.generate(input_ids, do_sample=False)`` gives in one
    process (rows that reached an EOS token continue with the pad token; it stops when
    every row has). Sampling, beam search and other generation options are refused.
    """
    unknown = sorted(set(kwargs) - GENERATE_ARGS)
    if unknown:
        raise ValueError(f"model.generate under context_parallel takes {sorted(GENERATE_ARGS)}; got {unknown}")
    gc = model.generation_config
    if kwargs.get("do_sample", gc.do_sample) or kwargs.get("num_beams", gc.num_beams or 1) != 1:
        raise ValueError("model.generate under context_parallel runs greedy decoding only (do_sample=False, num_beams=1)")
    if (gc.repetition_penalty or 1.0) != 1.0 or gc.no_repeat_ngram_size:
        raise ValueError("model.generate under context_parallel applies no logits processors (repetition penalty, "
                         "no-repeat n-grams): set them off in model.generation_config")
    check_no_padding(kwargs.get("attention_mask"))
    n = input_ids.shape[1]
    if max_new_tokens is None:
        max_new_tokens = gc.max_new_tokens if gc.max_new_tokens is not None else max(0, (gc.max_length or 20) - n)
    eos = kwargs.get("eos_token_id", gc.eos_token_id)
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.long,
                       device=input_ids.device)
    pad = kwargs.get("pad_token_id", gc.pad_token_id)
    pad = pad if pad is not None else int(eos[0]) if eos.numel() else 0
    world, rank = cp.world, dist.get_rank(cp.group)
    check_same_length(n, cp.group)
    cache = ShardedKVCache(n, cp.group, cp.layout)
    ids, pos = shard_inputs(input_ids, cp.group, cp.layout)
    # the last prompt position's logits, on the rank that holds it
    last_rank = next(r for r in range(world) if bool((positions(r, world, n, cp.layout) == n - 1).any()))
    keep: Any = 1
    if rank == last_rank:
        keep = torch.nonzero(pos[0] == n - 1).flatten()
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                       logits_to_keep=keep).logits
        token = _agreed(logits[:, -1].argmax(-1), last_rank, cp.group)
        out = [input_ids]
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            out.append(token[:, None])
            unfinished &= ~torch.isin(token, eos)
            if step == max_new_tokens - 1 or not bool(unfinished.any()):
                break
            position = torch.full_like(token[:, None], n + step)
            logits = model(input_ids=token[:, None], position_ids=position, past_key_values=cache,
                           use_cache=True).logits
            token = _agreed(logits[:, -1].argmax(-1), 0, cp.group)
    return torch.cat(out, dim=1)


def _agreed(token: torch.Tensor, src: int, group: Any) -> torch.Tensor:
    """``token`` (B,) of group rank ``src`` on every rank (all ranks decode alike; the
    broadcast makes the choice one, even if an argmax tie broke differently)."""
    token = token.contiguous()
    dist.broadcast(token, src=src if group is None else dist.get_global_rank(group, src), group=group)
    return token


def install(model: torch.nn.Module, cp: ContextParallel, set_attr: Any) -> Any:
    """Tag every attention module with ``cp`` (through ``set_attr(obj, name, value)``, which
    records how to undo it), check each forward's arguments (``check_call``), route
    ``model.generate`` to ``generate`` and say so in ``model.attnkit_assignment``.
    Returns the undo of the forward check."""
    from ..layer_attention import CP_ATTR

    for group in model_layers.attention_modules(model).values():
        for module in group:
            set_attr(module, CP_ATTR, cp)

    def check(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        check_call(cp, kwargs)

    handle = model.register_forward_pre_hook(check, with_kwargs=True)

    def generate_cp(input_ids: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("model.generate under context_parallel needs input_ids (B, N), the full prompt on every rank")
        return generate(model, cp, input_ids, **kwargs)

    set_attr(model, "generate", generate_cp)
    where = f"context parallel: {cp.layout} ring over {cp.world} ranks, sharded KV cache"
    set_attr(model, "attnkit_assignment", {idx: f"{what} ({where})"
                                           for idx, what in getattr(model, "attnkit_assignment", {}).items()})
    return handle.remove
