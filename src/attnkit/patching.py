"""attnkit methods inside Hugging Face ``transformers`` models, through its extension points.

attnkit registers one attention function and one mask function under the name
``"attnkit"`` (``transformers.AttentionInterface`` / ``AttentionMaskInterface``) and
selects it with ``model.set_attn_implementation("attnkit")``; no modeling code is
replaced. Which method a layer runs is recorded on its attention module (the modules
that carry a ``layer_idx``), so one function serves any number of models and plans.

    with attnkit.patch(model, prefill="streaming", sink=4, window=1024):
        out = model.generate(**inputs, max_new_tokens=32)

    attnkit.apply(model, {"default": "streaming", "layers": {0: "full", 1: ("full", {})}})
    attnkit.unpatch(model)

What runs where:

- prefill (query length T > 1) on a planned layer: ``attnkit.attention(q, k, v,
  method=..., causal=True, scale=module.scaling, backend=..., **config)``, in eval or
  train mode (exact gradients over the selected pattern; no attention dropout);
- decode steps (T == 1) and layers not in the plan: exact attention over the cache
  (``torch`` SDPA, GQA without repeating K/V);
- padded batches: when the mask transformers builds is causal (or full) attention
  restricted to one contiguous run of real tokens per row (left or right padding), each
  row runs the method on its own unpadded tokens, exactly as if it were alone; outputs
  at padded query positions are zero. Any other mask (sliding-window layers beyond
  their window, packed sequences, custom 4D masks) cannot be given to a sparse method,
  so that call runs exact SDPA with the mask (logged once at debug level).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from .cache_tag import cache_layer_of
from .kernels import attention_with_lse

logger = logging.getLogger(__name__)

IMPLEMENTATION = "attnkit"
_LAYER_ATTR = "_attnkit_layer"  # on each attention module: a LayerMethod, or None for exact
_SAVED_ATTR = "_attnkit_saved"  # on a model changed by `apply`: how to undo it

Spec = Union[None, str, tuple, "LayerMethod"]
PlanLike = Union[str, Mapping[Any, Any]]


@dataclass(frozen=True)
class LayerMethod:
    """One layer's prefill method: a registered name, its config fields, and the kernel
    backend that runs it (``"auto"`` or one of ``attnkit.kernels.BACKENDS``, passed to
    ``attnkit.attention(..., backend=...)``; e.g. ``"dense"`` to run the same allowed set
    with an explicit mask)."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"


# --- the attention function transformers calls -----------------------------------------


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
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attnkit attention does not support logit soft-capping (softcap)")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    spec: Optional[LayerMethod] = getattr(module, _LAYER_ATTR, None)
    position_ids = kwargs.get("position_ids")

    def compute() -> torch.Tensor:
        if spec is None or query.shape[2] == 1:
            return _exact(query, key, value, attention_mask, causal, scaling, position_ids, dropout)
        if dropout:
            raise ValueError(f"attnkit prefill methods do not implement attention dropout (got dropout={dropout}): "
                             "set the model config's attention_dropout to 0 to train with them, or call model.eval()")
        return _prefill(spec, query, key, value, attention_mask, causal, scaling, position_ids)

    # K/V from an attnkit.KVCache layer: the layer attends over its own (per-head) slots.
    cache_layer = cache_layer_of(key)
    if cache_layer is not None and cache_layer.rope_theta is None:
        cache_layer.rope_theta = _rope_theta(module)  # for policies that rotate queries (expected_attention)
    out = compute() if cache_layer is None else cache_layer.attention(query, attention_mask, scaling, compute)
    return out.transpose(1, 2).contiguous(), None


def _rope_theta(module: torch.nn.Module) -> Optional[float]:
    """The RoPE base of the module's model config (transformers 4.x ``rope_theta`` or 5.x
    ``rope_parameters["rope_theta"]``), or None."""
    cfg = getattr(module, "config", None)
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, Mapping) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    theta = getattr(cfg, "rope_theta", None)
    return float(theta) if theta is not None else None


def _prefill(
    spec: LayerMethod,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    causal: bool,
    scale: Optional[float],
    position_ids: Optional[torch.Tensor],
) -> torch.Tensor:
    """The layer's method over q: (B, Hq, T, D), k, v: (B, Hkv, T_kv, D) -> (B, Hq, T, D)."""
    if mask is None:
        if causal:
            k, v = _drop_empty_slots(k, v, q.shape[2], position_ids)
        return _method(spec, q, k, v, causal, scale)
    spans = _row_spans(mask, causal, q.shape[2])
    if spans is None:
        _debug_once(f"layer mask is not padding + {'causal' if causal else 'full'} attention; "
                    f"method {spec.name!r} falls back to exact SDPA with the mask for such calls")
        return _exact(q, k, v, mask, causal, scale, position_ids)
    return _per_row(spec, q, k, v, spans, causal, scale)


def _method(spec: LayerMethod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            causal: bool, scale: Optional[float]) -> torch.Tensor:
    """``attnkit.attention`` with the layer's method: (B, Hq, Nq, D) -> (B, Hq, Nq, D)."""
    import attnkit

    return attnkit.attention(q, k, v, method=spec.name, causal=causal, scale=scale, backend=spec.backend,
                             check_finite=False, **spec.config)


def _per_row(spec: LayerMethod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             spans: list[tuple[int, int]], causal: bool, scale: Optional[float]) -> torch.Tensor:
    """The method on each row's real tokens: key span [s, e) of row b, and the queries
    at those positions (query i sits at key position i + T_kv - T). Zeros elsewhere."""
    t, t_kv = q.shape[2], k.shape[2]
    shift = t_kv - t
    if len(set(spans)) == 1:  # all rows alike (e.g. a mask without padding): one call
        (s, e), = set(spans)
        q0, q1 = max(s - shift, 0), e - shift
        if (q0, q1, s, e) == (0, t, 0, t_kv):
            return _method(spec, q, k, v, causal, scale)
        spans_iter = [(slice(None), s, e)]
    else:
        spans_iter = [(slice(b, b + 1), s, e) for b, (s, e) in enumerate(spans)]
    out = q.new_zeros(q.shape)
    for rows, s, e in spans_iter:
        q0, q1 = max(s - shift, 0), e - shift
        if q1 <= q0:
            continue
        out[rows, :, q0:q1] = _method(spec, q[rows, :, q0:q1], k[rows, :, s:e], v[rows, :, s:e], causal, scale)
    return out


def _row_spans(mask: torch.Tensor, causal: bool, t: int) -> Optional[list[tuple[int, int]]]:
    """Per batch row, the key span [s, e) of real tokens, if ``mask`` is exactly
    ``base & (s <= j < e)`` with base causal (bottom-right) or full; None otherwise.

    mask: (B, 1, T, T_kv) boolean (broadcastable over B and T).
    """
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    t_kv = mask.shape[-1]
    m = mask[:, 0].expand(mask.shape[0], t, t_kv)
    keys = m.any(dim=1)  # (B, T_kv): every real key is seen by the last query
    start = keys.int().argmax(dim=1)
    end = t_kv - keys.flip(-1).int().argmax(dim=1)
    j = torch.arange(t_kv, device=mask.device)
    span = (j >= start[:, None]) & (j < end[:, None])
    base = torch.ones(t, t_kv, dtype=torch.bool, device=mask.device)
    if causal:
        base = base.tril(t_kv - t)
    if not torch.equal(m, base[None] & span[:, None, :]):
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


def _exact(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    causal: bool,
    scale: Optional[float],
    position_ids: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Exact attention (the kernel layer's ``attention_with_lse``), GQA heads not repeated.

    q: (B, Hq, T, D); k, v: (B, Hkv, T_kv, D); mask: boolean or additive, broadcastable
    to (B, Hq, T, T_kv), or None (then causal, bottom-right aligned, when T > 1).
    Returns (B, Hq, T, D); a query row that the mask leaves without keys gets zeros.
    Attention dropout (training with ``attention_dropout > 0``) is not implemented by the
    kernel layer: such calls run torch SDPA, which draws the dropout mask.
    """
    t = q.shape[2]
    if mask is None and causal and t > 1:
        k, v = _drop_empty_slots(k, v, t, position_ids)
    if dropout:
        is_causal = mask is None and causal and t > 1 and k.shape[2] == t
        if mask is None and causal and t > 1 and not is_causal:
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - t)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, _ = attention_with_lse(q, k, v, scale, causal=mask is None and causal and t > 1, mask=mask)
    return out


_LOGGED: set[str] = set()


def _debug_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.debug(message)


# --- plans ---------------------------------------------------------------------------


@dataclass
class _Saved:
    """What installing a plan changed, to put back."""

    implementation: Optional[str]
    layer_attrs: list[tuple[torch.nn.Module, bool, Any]]  # module, had attr, old value


def _spec(value: Spec) -> Optional[LayerMethod]:
    """A plan entry -> LayerMethod (None = exact): None, "name", ("name", {config}); a
    ``"backend"`` key of the config is the kernel backend, not a method field."""
    if value is None or isinstance(value, LayerMethod):
        return value
    if isinstance(value, str):
        return LayerMethod(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], Mapping):
        config = dict(value[1])
        return LayerMethod(value[0], config, config.pop("backend", "auto"))
    raise TypeError(f"a plan entry is None, a method name or (name, config dict), got {value!r}")


def _normalize(plan: PlanLike) -> tuple[Optional[LayerMethod], dict[int, Optional[LayerMethod]]]:
    """Any accepted plan form -> (default for unlisted layers, {layer_idx: method or None})."""
    if isinstance(plan, (str, tuple, LayerMethod)):
        return _spec(plan), {}
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must be a method name or a dict, got {type(plan).__name__}")
    if set(plan) - {"default", "layers"} and any(not isinstance(key, int) for key in plan):
        raise ValueError(f"plan keys are layer indices, or 'default' and 'layers'; got {sorted(map(str, plan))}")
    if "default" in plan or "layers" in plan:
        layers = plan.get("layers") or {}
        return _spec(plan.get("default")), {int(i): _spec(s) for i, s in layers.items()}
    return None, {int(i): _spec(s) for i, s in plan.items()}


def _for_layer(spec: Optional[LayerMethod], idx: int) -> Optional[LayerMethod]:
    """The layer's spec; a method calibrated per layer gets ``layer=idx`` (``registry.for_layer``)."""
    if spec is None:
        return None
    try:
        from . import registry
    except ImportError:  # the operator API is not importable: attnkit.attention will check
        return spec
    config = registry.for_layer(spec.name, spec.config, idx)
    return spec if config is spec.config else LayerMethod(spec.name, config, spec.backend)


def _check_method(spec: Optional[LayerMethod]) -> None:
    """Validate a method name and its config now, not at the first forward."""
    if spec is None:
        return
    _check_backend(spec.backend)
    try:
        from . import api, registry
    except ImportError:  # the operator API is not importable: attnkit.attention will check
        return
    if "prefill" not in registry.method_info(spec.name).kinds:
        raise ValueError(f"method {spec.name!r} is not a prefill method (it is a cache policy: pass cache=...)")
    api.get(spec.name, **spec.config)


def _check_backend(backend: Any) -> None:
    """A kernel backend name: ``"auto"`` or one of ``attnkit.kernels.BACKENDS``."""
    from . import validate
    from .kernels import BACKENDS

    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, one of {', '.join(BACKENDS)} (attnkit.kernels.BACKENDS); got {backend!r}")
    if backend not in BACKENDS:
        validate.unknown_name("backend", backend, list(BACKENDS))


def _attention_modules(model: torch.nn.Module) -> dict[int, list[torch.nn.Module]]:
    """Modules that carry an int ``layer_idx`` (attention and sometimes decoder layers)."""
    found: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int):
            found.setdefault(idx, []).append(module)
    if not found:
        raise ValueError(f"{type(model).__name__} has no modules with a `layer_idx`; attnkit cannot plan its layers")
    return found


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, attnkit_attention)
    # Without a mask function every layer gets attention_mask=None: padding would be lost.
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _install(model: torch.nn.Module, plan: PlanLike) -> _Saved:
    """Record the plan on the attention modules and select the "attnkit" implementation."""
    default, layers = _normalize(plan)
    modules = _attention_modules(model)
    unknown = sorted(set(layers) - set(modules))
    if unknown:
        raise ValueError(f"plan names layers {unknown}, but the model has layers 0..{max(modules)}")
    chosen = {idx: _for_layer(layers.get(idx, default), idx) for idx in modules}
    for spec in {repr(s): s for s in chosen.values()}.values():
        _check_method(spec)
    _register()
    saved = _Saved(getattr(model.config, "_attn_implementation", None), [])
    for idx, group in modules.items():
        for module in group:
            saved.layer_attrs.append((module, hasattr(module, _LAYER_ATTR), getattr(module, _LAYER_ATTR, None)))
            setattr(module, _LAYER_ATTR, chosen[idx])
    try:
        model.set_attn_implementation(IMPLEMENTATION)
        if model.config._attn_implementation != IMPLEMENTATION:
            raise ValueError(f"{type(model).__name__} cannot switch attention implementation (it does not use "
                             "transformers' AttentionInterface), so attnkit cannot patch it")
    except BaseException:
        _restore(model, saved)
        raise
    return saved


def _restore(model: torch.nn.Module, saved: _Saved) -> None:
    for module, had, old in reversed(saved.layer_attrs):
        if had:
            setattr(module, _LAYER_ATTR, old)
        elif hasattr(module, _LAYER_ATTR):
            delattr(module, _LAYER_ATTR)
    if saved.implementation is not None and model.config._attn_implementation != saved.implementation:
        model.set_attn_implementation(saved.implementation)


CACHE_FIELDS = ("budget", "ratio", "when", "interval")  # always the cache's


def _split_config(prefill: Optional[str], cache: Optional[str], config: dict[str, Any],
                  cache_config: Optional[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(prefill method fields, cache fields): budget/ratio/when/interval go to the cache;
    the other fields go to the cache when there is no prefill method, else to the method
    (the cache's own fields then come in ``cache_config``)."""
    config = dict(config)
    if cache is None:
        if cache_config:
            raise ValueError("cache_config was given without cache=POLICY")
        return config, {}
    cache_kw = {name: config.pop(name) for name in CACHE_FIELDS if name in config}
    if prefill is None:
        cache_kw.update(config)
        config = {}
    cache_kw.update(dict(cache_config or {}))
    return config, cache_kw


def _plan_from_args(prefill: Optional[str], layers: Optional[Iterable[int]],
                    config: dict[str, Any], dense_layers: int = 0, backend: str = "auto") -> PlanLike:
    if isinstance(dense_layers, bool) or not isinstance(dense_layers, int) or dense_layers < 0:
        raise ValueError(f"dense_layers must be an integer >= 0 (the first layers that keep exact attention), got {dense_layers!r}")
    _check_backend(backend)
    if prefill is None:
        if config:
            raise ValueError(f"config fields {sorted(config)} were given without a prefill method")
        if backend != "auto":
            raise ValueError(f"backend={backend!r} selects the kernel of the prefill method; it was given without prefill=METHOD")
        return {"default": None}
    spec = LayerMethod(prefill, dict(config), backend)
    if layers is None:
        return {"default": spec, "layers": {i: None for i in range(dense_layers)}}
    if dense_layers:
        raise ValueError("give either layers (the layers that use the method) or dense_layers (the first layers that stay exact), not both")
    return {int(i): spec for i in layers}


# --- public API ----------------------------------------------------------------------


@contextmanager
def patch(
    model: torch.nn.Module,
    prefill: Optional[str] = None,
    cache: Optional[str] = None,
    layers: Optional[Iterable[int]] = None,
    cache_config: Optional[Mapping[str, Any]] = None,
    dense_layers: int = 0,
    backend: str = "auto",
    **config: Any,
) -> Iterator[torch.nn.Module]:
    """Run ``model`` with an attnkit prefill method inside a ``with`` block.

    ``prefill``: registered method name for prefill attention (None: exact everywhere);
    ``layers``: layer indices that use it (default all; the others stay exact);
    ``dense_layers``: or keep the first ``dense_layers`` layers exact and use the method
    on all later ones (MInference's ``starting_layer``);
    ``config``: the method's config fields, e.g. ``sink=4, window=1024``; ``cache``: a
    KV-cache policy (``attnkit.KVCache``): inside the block ``model.generate`` without
    ``past_key_values`` gets a fresh ``KVCache(cache, ...)``. Routing: ``budget``,
    ``ratio``, ``when`` and ``interval`` always go to the cache; the other fields go to
    the cache when ``prefill`` is None, else to the prefill method, and the cache's own
    fields come in ``cache_config={...}``; ``backend``: the kernel backend of the
    prefill method, ``"auto"`` or one of ``attnkit.kernels.BACKENDS`` (passed to
    ``attnkit.attention(..., backend=...)``; e.g. ``"dense"`` runs the same allowed set as
    one explicit mask; a backend that cannot run a call raises at that call). The
    model's attention implementation, plan and ``generate`` are restored on exit, also
    after an exception. The methods are differentiable: in ``model.train()`` the
    gradients are exact over the pattern each method selected (docs/training.md).

        with attnkit.patch(model, cache="snapkv", budget=256, window=32):
            out = model.generate(**inputs, max_new_tokens=32)
    """
    method_config, cache_kw = _split_config(prefill, cache, config, cache_config)
    if cache is not None:
        from .kvcache import KVCache

        KVCache(policy=cache, **cache_kw)  # a bad policy or field fails before anything changes
    saved = _install(model, _plan_from_args(prefill, layers, method_config, dense_layers, backend))
    try:
        if cache is None:
            yield model
        else:
            from .kvcache import generate_with_cache

            with generate_with_cache(model, cache, **cache_kw):
                yield model
    finally:
        _restore(model, saved)


def apply(model: torch.nn.Module, plan: PlanLike) -> torch.nn.Module:
    """Switch ``model`` to attnkit attention until ``unpatch(model)``; returns the model.

    ``plan`` is one of:

    - ``"streaming"``: that method on every layer, default config;
    - ``{layer_idx: entry}``: only the listed layers, the others exact;
    - ``{"default": entry, "layers": {layer_idx: entry}}``: ``default`` for unlisted layers;

    where an entry is a method name, ``(name, {config fields})``, a ``LayerMethod``, or
    None (exact). A ``"backend"`` key in the config dict (``("moba", {"topk": 3,
    "backend": "dense"})``, or ``LayerMethod(name, config, backend)``) forces that
    layer's kernel backend, one of ``attnkit.kernels.BACKENDS`` (default ``"auto"``).
    Applying again replaces the plan; ``unpatch`` returns to the model as it was before
    the first ``apply``.
    """
    previous = getattr(model, _SAVED_ATTR, None)
    saved = _install(model, plan)
    if previous is not None:
        # Undo to the state before the first apply: the originals are in `previous`.
        saved = _Saved(previous.implementation, previous.layer_attrs)
    object.__setattr__(model, _SAVED_ATTR, saved)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply``: the original attention implementation, no attnkit plan. Returns the model."""
    saved = model.__dict__.pop(_SAVED_ATTR, None)
    if saved is not None:
        _restore(model, saved)
    return model


def current_plan(model: torch.nn.Module) -> dict[int, Optional[LayerMethod]]:
    """The method each layer runs now ({layer_idx: LayerMethod or None for exact})."""
    return {idx: getattr(group[0], _LAYER_ATTR, None) for idx, group in sorted(_attention_modules(model).items())}
