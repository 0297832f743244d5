"""The attention function that transformers calls for a patched layer (``"attnkit"``).

One call of a transformers attention module arrives here with the layer's q, k, v, the
mask transformers built (``sdpa_mask``) and the layer's own keyword arguments. What runs:

- **decode** (one query) and calls the layer's plan leaves exact: exact attention over
  the keys the mask allows (the kernel layer's dense kernel, GQA heads not repeated);
- **prefill on a planned layer**: ``attnkit.attention`` with the layer's method, row by
  row on each row's real tokens when the batch is padded;
- **the model's own sliding-window layers** (``sliding_window=w`` from the module):
  transformers computes them as dense masked SDPA, O(N^2) work for an O(N w) pattern;
  here they run attnkit's exact ``sliding_window`` kernel, and a user's static prefill
  method runs the intersection of its pattern and the window (an unpadded prefill gets
  no mask from ``layer_mask``: the window comes from ``sliding_window`` alone);
- **cross-attention** (a module tagged at ``patch`` time): always exact, the encoder
  padding masks keys and no decoder query is dropped;
- an additive ``position_bias`` (T5 family) or logit ``softcap`` (Gemma 2): exact, with
  the bias / cap applied as transformers' own path does (``patch`` refuses a sparse
  method on such a model, with the reason);
- any other mask (packed sequences, custom 4D masks): exact with the mask;
- **context parallel** (``patch(model, context_parallel=group)``): the layer's
  ``ContextParallel`` (``attnkit.distributed.model``) runs the ring at prefill and the
  sharded cache's merge at decode; the model's mask is not used (causal, no padding).

A keyword argument this function does not implement (e.g. gpt-oss's ``s_aux`` sinks)
is an error naming it, never silently ignored.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from . import api
from .cache_tag import cache_layer_of, latent_layer_of
from .kernels import attention_with_lse
from .kernels.backends import as_block_pattern
from .layer_mask import allowed_positions, window_bites, window_mask
from .methods.base import PatternMethod
from .methods.sparse_static.within_window import WithinWindow

logger = logging.getLogger("attnkit.patching")

LAYER_ATTR = "_attnkit_layer"  # on each attention module: a LayerMethod, or None for exact
CROSS_ATTR = "_attnkit_cross"  # on cross-attention modules: True
CP_ATTR = "_attnkit_context_parallel"  # under patch(context_parallel=...): a distributed.model.ContextParallel

# Keyword arguments that do not change the attention itself (bookkeeping of the model).
IGNORED_KWARGS = frozenset({
    "cache_position", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "past_key_values", "past_key_value", "num_items_in_batch", "token_type_ids", "cu_seq_lens_q", "cu_seq_lens_k",
    "max_length_q", "max_length_k", "position_embeddings", "layer_idx", "is_causal", "cache", "target_dtype",
    "deterministic",  # a flash-attn flag (ModernBERT); attnkit's kernels are deterministic
    "output_router_logits",  # MoE bookkeeping (Qwen3-Next, MiniMax): the router's, not the attention's
})
HANDLED_KWARGS = frozenset({"sliding_window", "position_bias", "softcap", "position_ids"})


@dataclass(frozen=True)
class LayerMethod:
    """One layer's prefill method: a registered name, its config fields, and the kernel
    backend that runs it (``"auto"`` or one of ``attnkit.kernels.BACKENDS``, passed to
    ``attnkit.attention(..., backend=...)``; e.g. ``"dense"`` to run the same allowed set
    with an explicit mask)."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"


@dataclass(frozen=True)
class LayerCall:
    """What one call of a layer asks for besides q, k, v and the mask."""

    causal: bool
    cross: bool = False
    window: Optional[int] = None  # the layer's own sliding window (keys i - w < j <= i)
    bias: Optional[torch.Tensor] = None  # additive, broadcastable to (B, Hq, T, T_kv)
    softcap: Optional[float] = None
    position_ids: Optional[torch.Tensor] = None


def read_call(module: torch.nn.Module, is_causal: Optional[bool], kwargs: dict[str, Any]) -> LayerCall:
    """The LayerCall of one call; an unimplemented keyword argument is an error."""
    unknown = sorted(name for name, value in kwargs.items()
                     if value is not None and name not in IGNORED_KWARGS and name not in HANDLED_KWARGS)
    if unknown:
        raise NotImplementedError(
            f"{type(module).__name__} passes {', '.join(map(repr, unknown))} to its attention function, which attnkit "
            f"does not implement (it implements {', '.join(sorted(HANDLED_KWARGS))}); this model cannot run under attnkit")
    cross = bool(getattr(module, CROSS_ATTR, False))
    causal = False if cross else bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    return LayerCall(causal=causal, cross=cross, window=int(window) if window else None,
                     bias=kwargs.get("position_bias"), softcap=float(softcap) if softcap else None,
                     position_ids=kwargs.get("position_ids"))


def attnkit_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function registered as ``"attnkit"``.

    query: (B, Hq, T, D); key, value: (B, Hkv, T_kv, D) with RoPE applied, the cache
    included and GQA heads not repeated; attention_mask: boolean (B, 1, T, T_kv), or
    None when there is no padding. Returns ((B, T, Hq, D) contiguous, None).
    """
    call = read_call(module, is_causal, kwargs)
    spec: Optional[LayerMethod] = None if call.cross else getattr(module, LAYER_ATTR, None)
    context_parallel = getattr(module, CP_ATTR, None)
    if context_parallel is not None:  # the sequence is sharded across ranks: the ring, or the sharded cache
        return context_parallel.attention(query, key, value, scaling, spec).transpose(1, 2).contiguous(), None
    if spec is not None and spec.name == "full" and spec.backend == "auto":
        spec = None  # "full" is exact attention: the same path as no method (torch's fused SDPA where it can)

    def compute() -> torch.Tensor:
        exact_call = query.shape[2] == 1 or call.bias is not None or (spec is None and call.softcap is not None)
        if exact_call or (spec is None and (dropout or call.window is None)):
            mask = attention_mask if attention_mask is not None else window_mask(call.window, call.causal, query.shape[2], key)
            return exact(query, key, value, mask, call, scaling, dropout)
        if dropout:
            raise ValueError(f"attnkit prefill methods do not implement attention dropout (got dropout={dropout}): "
                             "set the model config's attention_dropout to 0 to train with them, or call model.eval()")
        return prefill(spec, query, key, value, attention_mask, call, scaling)

    # K/V from an attnkit.KVCache layer: the layer attends over its own (per-head) slots.
    cache_layer = cache_layer_of(key)
    if cache_layer is not None:
        cache_layer.window = None if call.cross else call.window  # a window layer holds only its window
        if cache_layer.rope_theta is None:
            cache_layer.rope_theta = rope_theta(module)  # for policies that rotate queries (expected_attention)
    elif not call.cross and (latent := latent_layer_of(module, key)) is not None:
        # MLA (Kimi-Linear): the cache holds latents; these keys and values were expanded from them
        return latent.attention(query, attention_mask, scaling, compute, expanded=(key, value)).transpose(1, 2).contiguous(), None
    out = compute() if cache_layer is None else cache_layer.attention(query, attention_mask, scaling, compute)
    return out.transpose(1, 2).contiguous(), None


def rope_theta(module: torch.nn.Module) -> Optional[float]:
    """The RoPE base of the module's model config (transformers 4.x ``rope_theta`` or 5.x
    ``rope_parameters["rope_theta"]``), or None."""
    cfg = getattr(module, "config", None)
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    theta = getattr(cfg, "rope_theta", None)
    return float(theta) if theta is not None else None


# --- prefill with a method ----------------------------------------------------------------


def prefill(spec: Optional[LayerMethod], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: Optional[torch.Tensor], call: LayerCall, scale: Optional[float]) -> torch.Tensor:
    """The layer's method (or its own window) over q: (B, Hq, T, D), k, v: (B, Hkv, T_kv, D)."""
    if mask is None:
        # No mask: no padding; a window layer's window is applied here (layer_mask leaves
        # out the (T, T) mask of a fresh unpadded prefill), and only where it bites.
        if call.causal:
            k, v = _drop_empty_slots(k, v, q.shape[2], call.position_ids)
        window = call.window if window_bites(call.window, call.causal, q.shape[2], k.shape[2]) else None
        if spec is None and window is None:
            return exact(q, k, v, None, call, scale)
        return run_method(spec, q, k, v, call.causal, scale, window, softcap=call.softcap)
    spans = row_spans(mask, call.causal, q.shape[2], call.window)
    if spans is None:
        window = f" with a sliding window of {call.window}" if call.window else ""
        _debug_once(f"layer mask is not padding + {'causal' if call.causal else 'full'} attention{window}; "
                    f"{'method ' + repr(spec.name) if spec else 'the layer'} runs exact SDPA with the mask for such calls")
        return exact(q, k, v, mask, call, scale)
    return per_row(spec, q, k, v, spans, call, scale)


def run_method(spec: Optional[LayerMethod], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               scale: Optional[float], window: Optional[int] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """The layer's method, within the layer's own ``window`` if it has one, with the
    layer's logit ``softcap`` if it has one: (B, Hq, Nq, D) -> (B, Hq, Nq, D)."""
    if softcap is not None:
        return softcapped_method(spec, q, k, v, causal, scale, window, softcap)
    if window is None:
        assert spec is not None
        return api.attention(q, k, v, method=spec.name, causal=causal, scale=scale, backend=spec.backend,
                             check_finite=False, **spec.config)
    method = windowed(spec, window)
    return method(q, k, v, causal=causal, scale=scale, backend=spec.backend if spec else "auto", check_finite=False)


def softcapped_method(spec: Optional[LayerMethod], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: Optional[float], window: Optional[int], cap: float) -> torch.Tensor:
    """A method on a layer with soft-capped logits (Gemma 2): the allowed set the method
    selects for these q, k (its patterns, as one Nq x Nk mask) under ``softcapped``
    exact attention. The sparse kernels do not apply a cap, so this is the dense route:
    O(Nq Nk) like transformers' eager path, with the method's exact semantics.
    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) -> (B, Hq, Nq, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    method = windowed(spec, window) if window is not None else None if spec is None or spec.name == "full" \
        else api.get(spec.name, **spec.config)
    if method is None:
        return softcapped(q, k, v, allowed_positions(q.shape[2], k.shape[2], causal, None, q.device), scale, cap)
    patterns = method.patterns(q, k, causal, scale)
    if not patterns:
        raise NotImplementedError(f"method {spec.name!r} runs its own kernel, which does not apply a logit soft-cap "
                                  "(this model soft-caps its attention logits): use a pattern-based method")
    mask = None
    for pattern in patterns:  # a mixed method's parts are disjoint: their union is its allowed set
        part = as_block_pattern(pattern, q.shape[1]).dense_mask(q.shape[0], q.shape[1])
        mask = part if mask is None else mask | part
    return softcapped(q, k, v, mask, scale, cap)


_WINDOWED: dict[tuple, Any] = {}


def windowed(spec: Optional[LayerMethod], window: int) -> Any:
    """The method a window layer runs: the exact window (no method, ``full``, or a dynamic
    method, whose estimate does not know the window: logged), or a static pattern
    intersected with the window. Cached per (spec, window)."""
    key = (repr(spec), window)
    if key not in _WINDOWED:
        inner = None if spec is None or spec.name == "full" else api.get(spec.name, **spec.config)
        if inner is not None and not isinstance(inner, PatternMethod):
            logger.info("method %r is dynamic: on a layer with its own sliding window of %d it runs the exact "
                        "window instead (a dynamic estimate cannot be intersected with the window)", spec.name, window)
            inner = None
        window_method = api.get("sliding_window", window=window)
        _WINDOWED[key] = window_method if inner is None else WithinWindow(inner, window_method)
    return _WINDOWED[key]


def per_row(spec: Optional[LayerMethod], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            spans: list[tuple[int, int]], call: LayerCall, scale: Optional[float]) -> torch.Tensor:
    """The method on each row's real keys [s, e): causal rows keep the queries at those
    positions (query i sits at key position i + T_kv - T; zeros elsewhere), non-causal
    rows keep every query (transformers' mask hides padded keys, not queries)."""
    t, t_kv = q.shape[2], k.shape[2]
    shift = t_kv - t

    def queries(s: int, e: int) -> tuple[int, int]:
        return (max(s - shift, 0), e - shift) if call.causal else (0, t)

    if len(set(spans)) == 1:  # all rows alike (e.g. a mask without padding): one call
        (s, e), = set(spans)
        if queries(s, e) == (0, t) and (s, e) == (0, t_kv):
            return run_method(spec, q, k, v, call.causal, scale, call.window, call.softcap)
        row_sets = [(slice(None), s, e)]
    else:
        row_sets = [(slice(b, b + 1), s, e) for b, (s, e) in enumerate(spans)]
    out = q.new_zeros(q.shape)
    for rows, s, e in row_sets:
        q0, q1 = queries(s, e)
        if q1 <= q0 or e <= s:
            continue
        out[rows, :, q0:q1] = run_method(spec, q[rows, :, q0:q1], k[rows, :, s:e], v[rows, :, s:e], call.causal,
                                         scale, call.window, call.softcap)
    return out


_SPANS_CACHE: dict[str, Any] = {}


def row_spans(mask: torch.Tensor, causal: bool, t: int, window: Optional[int] = None) -> Optional[list[tuple[int, int]]]:
    """Per batch row, the key span [s, e) of real tokens, if ``mask`` is exactly
    ``base & (s <= j < e)`` with base causal (bottom-right) or full, restricted to the
    layer's sliding ``window`` if it has one; None otherwise.

    mask: (B, 1, T, T_kv) boolean (broadcastable over B and T). The answer for the last
    mask seen is kept (all layers of one forward share it).
    """
    key = (causal, t, window)
    cached = _SPANS_CACHE.get("last")
    if cached is not None and cached[0]() is mask and cached[1] == key:
        return cached[2]
    spans = _row_spans(mask, causal, t, window)
    _SPANS_CACHE["last"] = (weakref.ref(mask), key, spans)
    return spans


def _row_spans(mask: torch.Tensor, causal: bool, t: int, window: Optional[int]) -> Optional[list[tuple[int, int]]]:
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    t_kv = mask.shape[-1]
    m = mask[:, 0].expand(mask.shape[0], t, t_kv)
    keys = m.any(dim=1)  # (B, T_kv): every real key is seen by some query
    start = keys.int().argmax(dim=1)
    end = t_kv - keys.flip(-1).int().argmax(dim=1)
    j = torch.arange(t_kv, device=mask.device)
    span = (j >= start[:, None]) & (j < end[:, None])
    if not torch.equal(m, allowed_positions(t, t_kv, causal, window, mask.device)[None] & span[:, None, :]):
        return None
    return list(zip(start.tolist(), end.tolist()))


def _drop_empty_slots(k: torch.Tensor, v: torch.Tensor, t: int,
                      position_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys beyond the queries when no mask came: transformers omits the mask of a
    prefill into an empty static cache (T_kv > T, queries from position 0), where the
    extra keys are unwritten slots; otherwise the queries are the last T positions."""
    if k.shape[2] > t and position_ids is not None and int(position_ids[:, 0].min()) == 0:
        return k[:, :, :t], v[:, :, :t]
    return k, v


# --- exact attention ------------------------------------------------------------------


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], call: LayerCall,
          scale: Optional[float], dropout: float = 0.0) -> torch.Tensor:
    """Exact attention over what ``mask`` allows, with the call's bias or softcap.

    q: (B, Hq, T, D); k, v: (B, Hkv, T_kv, D); mask: boolean or additive, broadcastable
    to (B, Hq, T, T_kv), or None (then causal, bottom-right aligned, when T > 1 and the
    call is causal). Returns (B, Hq, T, D); a query row the mask leaves without keys gets
    zeros. Dropout and a bias run torch SDPA (which draws the dropout mask and adds the
    bias as transformers does); a softcap runs the chunked math of ``softcapped``.
    """
    t = q.shape[2]
    causal = call.causal and t > 1
    if mask is None and causal:
        k, v = _drop_empty_slots(k, v, t, call.position_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if call.softcap is not None:
        return softcapped(q, k, v, _boolean(mask, causal, t, k.shape[2], q.device), scale, call.softcap, call.bias)
    if dropout or call.bias is not None:
        mask = _with_bias(_boolean(mask, causal, t, k.shape[2], q.device), call.bias, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=mask is None and causal and k.shape[2] == t, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    if q.shape[2] * (q.shape[1] // k.shape[1]) <= DECODE_ROWS and not torch.is_grad_enabled():
        return few_queries(q, k, v, _boolean(mask, causal, t, k.shape[2], q.device), scale)
    if mask is None and (not causal or k.shape[2] == t):
        # every row has keys: torch's fused SDPA (measured faster than the tiled kernel here)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    out, _ = attention_with_lse(q, k, v, scale, causal=mask is None and causal, mask=mask)
    return out


DECODE_ROWS = 64  # query rows per KV head (T x group) up to which few_queries runs


def few_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                scale: float) -> torch.Tensor:
    """Exact attention for a few queries (decode steps): each KV head's query rows packed
    into one (group x T, N) product, as transformers' SDPA path packs GQA at decode; the
    tiled kernels are built for many rows and are slow here.

    q: (B, Hq, T, D); k, v: (B, Hkv, N, D); mask: boolean or additive, broadcastable to
    (B, Hq, T, N), or None. Returns (B, Hq, T, Dv); a row without keys gets zeros.
    """
    b, hq, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (q.reshape(b, hkv, g * t, d) @ k.transpose(-1, -2)).to(compute) * scale  # (B, Hkv, g T, N)
    if mask is not None:
        mask = _packed_mask(mask, hq, hkv, t, n)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(compute)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(v.dtype)
    return (probs @ v).reshape(b, hq, t, v.shape[-1])


def _packed_mask(mask: torch.Tensor, hq: int, hkv: int, t: int, n: int) -> torch.Tensor:
    """A mask broadcastable to (B, Hq, T, N) in the packed layout (B, Hkv or 1, group x T, N)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mb, g = mask.shape[0], hq // hkv
    if mask.shape[1] == 1:
        return mask.expand(mb, 1, t, n).unsqueeze(2).expand(mb, 1, g, t, n).reshape(mb, 1, g * t, n)
    return mask.expand(mb, hq, t, n).reshape(mb, hkv, g * t, n)


def _boolean(mask: Optional[torch.Tensor], causal: bool, t: int, t_kv: int, device: torch.device) -> Optional[torch.Tensor]:
    """The mask, or the causal (bottom-right) one when none came and the call is causal."""
    if mask is None and causal:
        return torch.ones(t, t_kv, dtype=torch.bool, device=device).tril(t_kv - t)
    return mask


def _with_bias(mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """An additive mask: the bias where ``mask`` allows, the dtype's minimum elsewhere
    (transformers' ``create_position_bias_mask``)."""
    if bias is None:
        return mask
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.finfo(dtype).min)
    return bias + mask


SOFTCAP_ROWS = 256  # query rows per step of the soft-capped math (bounds its (rows, T_kv) scores)


def softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
               cap: float, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention with logit soft-capping, ``cap * tanh(q k^T * scale / cap)`` (Gemma 2),
    then the mask and softmax in float32, as transformers' eager path computes it.

    q: (B, Hq, T, D); k, v: (B, Hkv, T_kv, D); mask: boolean or additive, broadcastable to
    (B, Hq, T, T_kv), or None. Query rows run SOFTCAP_ROWS at a time. Returns (B, Hq, T, D).
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = torch.empty_like(q)
    for r0 in range(0, q.shape[2], SOFTCAP_ROWS):
        rows = slice(r0, r0 + SOFTCAP_ROWS)
        scores = torch.tanh((q[:, :, rows] @ k.transpose(-1, -2)) * (scale / cap)) * cap
        if bias is not None:
            scores = scores + bias[..., rows, :]
        if mask is not None:
            part = mask[..., rows, :] if mask.shape[-2] > 1 else mask
            scores = scores.masked_fill(~part, float("-inf")) if part.dtype == torch.bool else scores + part
        probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
        out[:, :, rows] = probs @ v
    return out


_LOGGED: set[str] = set()


def _debug_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.debug(message)
