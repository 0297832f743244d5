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

What runs where (``attnkit.layer_attention``): prefill on a planned layer runs
``attnkit.attention`` with the layer's method (row by row on padded batches); decode
steps and unplanned layers run exact attention over the cache; the model's own
sliding-window layers run attnkit's exact ``sliding_window`` kernel (a static method
there runs within the window); cross-attention, T5's position bias and Gemma 2's
soft-cap run exactly. ``patch`` refuses what it cannot run, before anything changes,
and logs at INFO (and stores in ``model.attnkit_assignment``) what each layer runs.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Optional, Union

import torch

from . import api, hybrid, model_layers, registry, validate
from .kernels import BACKENDS
from .layer_attention import CROSS_ATTR, LAYER_ATTR, LayerMethod, attnkit_attention, row_spans
from .layer_mask import attnkit_mask

logger = logging.getLogger(__name__)

IMPLEMENTATION = "attnkit"
_SAVED_ATTR = "_attnkit_saved"  # on a model changed by `apply`: how to undo it
_ASSIGNMENT_ATTR = "attnkit_assignment"  # on a patched model: {layer_idx: what it runs, in words}

Spec = Union[None, str, tuple, LayerMethod]
PlanLike = Union[str, Mapping[Any, Any]]

__all__ = ["IMPLEMENTATION", "LayerMethod", "apply", "assignment", "attnkit_attention", "current_plan", "patch",
           "row_spans", "unpatch"]


# --- plans ---------------------------------------------------------------------------


@dataclass
class _Saved:
    """What installing a plan changed, to put back: the implementation, each attribute
    set on a module as (module, attribute, had it, old value), and undo functions run
    after those (the hybrid layers' swapped kernel functions, ``hybrid.install``)."""

    implementation: Optional[str]
    attrs: list[tuple[torch.nn.Module, str, bool, Any]]
    after: list[Callable[[], None]] = field(default_factory=list)


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
    config = registry.for_layer(spec.name, spec.config, idx)
    return spec if config is spec.config else LayerMethod(spec.name, config, spec.backend)


def _check_method(spec: Optional[LayerMethod]) -> None:
    """Validate a method name and its config now, not at the first forward."""
    if spec is None:
        return
    _check_backend(spec.backend)
    if "prefill" not in registry.method_info(spec.name).kinds:
        raise ValueError(f"method {spec.name!r} is not a prefill method (it is a cache policy: pass cache=...)")
    if registry.method_info(spec.name).family == "linear":
        raise ValueError(f"method {spec.name!r} is a linear-attention method: it is not a drop-in for a softmax "
                         f"attention layer (it computes another function); use it through ak.attention")
    api.get(spec.name, **spec.config)


def _check_backend(backend: Any) -> None:
    """A kernel backend name: ``"auto"`` or one of ``attnkit.kernels.BACKENDS``."""
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, one of {', '.join(BACKENDS)} (attnkit.kernels.BACKENDS); got {backend!r}")
    if backend not in BACKENDS:
        validate.unknown_name("backend", backend, list(BACKENDS))


def _check_architecture(model: torch.nn.Module, chosen: Mapping[int, Optional[LayerMethod]]) -> None:
    """Refuse, before anything changes, a model attnkit cannot run, and a sparse method on
    a model whose attention it can only run exactly (an additive position bias)."""
    reason = model_layers.unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"attnkit cannot patch {type(model).__name__}: {reason}")
    reason = model_layers.exact_only_reason(model)
    sparse = sorted({s.name for s in chosen.values() if s is not None and s.name != "full"})
    if reason is not None and sparse:
        raise ValueError(f"{type(model).__name__} can run only exact attention under attnkit ({reason}); "
                         f"got prefill method(s) {sparse}: use prefill=None or 'full'")


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, attnkit_attention)
    # Without a mask function every layer gets attention_mask=None: padding would be lost.
    # attnkit_mask is sdpa_mask without the (T, T) mask of an unpadded sliding-window prefill.
    AttentionMaskInterface.register(IMPLEMENTATION, attnkit_mask)


def _set(saved: _Saved, module: torch.nn.Module, name: str, value: Any) -> None:
    # "had" means set on the object itself: a class attribute (a method) is left to the class
    saved.attrs.append((module, name, name in vars(module), vars(module).get(name)))
    setattr(module, name, value)


def _install(model: torch.nn.Module, plan: PlanLike) -> _Saved:
    """Record the plan on the attention modules and select the "attnkit" implementation."""
    default, layers = _normalize(plan)
    modules = model_layers.attention_modules(model)
    unknown = sorted(set(layers) - set(modules))
    if unknown:
        raise ValueError(f"plan names layers {unknown}, but the model has layers 0..{max(modules)}")
    chosen = {idx: _for_layer(layers.get(idx, default), idx) for idx in modules}
    for spec in {repr(s): s for s in chosen.values()}.values():
        _check_method(spec)
    _check_architecture(model, chosen)
    _register()
    saved = _Saved(getattr(model.config, "_attn_implementation", None), [])
    for idx, group in modules.items():
        for module in group:
            _set(saved, module, LAYER_ATTR, chosen[idx])
    for module in model_layers.cross_attention_modules(model):
        _set(saved, module, CROSS_ATTR, True)
    try:
        model.set_attn_implementation(IMPLEMENTATION)
        if model.config._attn_implementation != IMPLEMENTATION:
            raise ValueError(f"{type(model).__name__} cannot switch attention implementation (it does not use "
                             "transformers' AttentionInterface), so attnkit cannot patch it")
        # linear-attention layers of hybrid models: attnkit's kernels for transformers' fallbacks
        saved.after.append(hybrid.install(model, lambda obj, name, value: _set(saved, obj, name, value)))
    except BaseException:
        _restore(model, saved)
        raise
    _set(saved, model, _ASSIGNMENT_ATTR, assignment(model))
    for idx, what in model.attnkit_assignment.items():
        logger.info("attnkit: layer %d runs %s", idx, what)
    return saved


def _restore(model: torch.nn.Module, saved: _Saved) -> None:
    for module, name, had, old in reversed(saved.attrs):
        if had:
            setattr(module, name, old)
        elif hasattr(module, name):
            delattr(module, name)
    if saved.implementation is not None and model.config._attn_implementation != saved.implementation:
        model.set_attn_implementation(saved.implementation)
    for undo in reversed(saved.after):
        undo()
    saved.after.clear()


def assignment(model: torch.nn.Module) -> dict[int, str]:
    """What each layer of a patched model runs, in words ({layer_idx: description}; an
    encoder-decoder's layers with one index are joined by "; ")."""
    reason = model_layers.exact_only_reason(model)
    linear = hybrid.hybrid_layers(model)
    out: dict[int, str] = {}
    for idx, group in sorted(model_layers.attention_modules(model).items()):
        parts = []
        for module in group:
            if module in linear:
                parts.append(hybrid.describe(linear[module]))
                continue
            if not hasattr(module, LAYER_ATTR) or module is not model and hasattr(module, "self_attn"):
                continue  # a decoder layer that carries layer_idx: its attention module speaks for it
            what = model_layers.describe(getattr(module, LAYER_ATTR), model_layers.own_window(module),
                                         bool(getattr(module, CROSS_ATTR, False)), reason, model_layers.softcap_of(model))
            if what not in parts:
                parts.append(what)
        out[idx] = "; ".join(parts) if parts else "exact"
    return out


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


class _PatchBlock:
    """What ``patch()`` returns: the ``with`` block that installs the plan on entry.

    ``patch(model, ...)`` alone changes nothing (the plan is installed by ``__enter__``);
    an object dropped without entering warns, because that is the usual mistake.
    """

    def __init__(self, block: Any) -> None:
        self._block = block
        self._entered = False

    def __enter__(self) -> torch.nn.Module:
        self._entered = True
        return self._block.__enter__()

    def __exit__(self, *exc: Any) -> Optional[bool]:
        return self._block.__exit__(*exc)

    def __del__(self) -> None:
        if not getattr(self, "_entered", True):
            warnings.warn("attnkit.patch(model, ...) was called without `with`, so the model was not "
                          "changed; use `with attnkit.patch(model, ...): ...`, or "
                          "`attnkit.apply(model, plan)` to switch it until `attnkit.unpatch(model)`",
                          RuntimeWarning, stacklevel=2)


def patch(
    model: torch.nn.Module,
    prefill: Optional[str] = None,
    cache: Optional[str] = None,
    layers: Optional[Iterable[int]] = None,
    cache_config: Optional[Mapping[str, Any]] = None,
    dense_layers: int = 0,
    backend: str = "auto",
    context_parallel: Any = None,
    context_parallel_layout: str = "zigzag",
    **config: Any,
) -> ContextManager[torch.nn.Module]:
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
    one explicit mask; a backend that cannot run a call raises at that call);
    ``context_parallel``: a ``torch.distributed`` process group (or True: the default
    group): the sequence is sharded across its ranks (``context_parallel_layout``
    ``"zigzag"`` or ``"contiguous"``), every attention layer runs ``ring_attention``,
    each forward takes this rank's shard and its ``position_ids``
    (``attnkit.distributed.shard_inputs``), and ``model.generate(input_ids, ...)`` decodes
    greedily over a sharded KV cache (docs/distributed.md, "Model level"). The
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
        reason = hybrid.cache_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"cache={cache!r}: {reason}; patch it without cache= "
                             f"(transformers' own cache keeps working, with attnkit's kernels)")
    plan = _plan_from_args(prefill, layers, method_config, dense_layers, backend)
    cp = None
    if context_parallel is not None and context_parallel is not False:
        from .distributed.model import prepare

        default, chosen = _normalize(plan)
        cp = prepare(model, context_parallel, context_parallel_layout, [default, *chosen.values()], cache)
    return _PatchBlock(_patch_block(model, plan, cache, cache_kw, cp))


@contextmanager
def _patch_block(model: torch.nn.Module, plan: PlanLike, cache: Optional[str], cache_kw: dict[str, Any],
                 cp: Any) -> Iterator[torch.nn.Module]:
    """Install ``plan`` (and context parallelism ``cp``) for the block; restore on exit."""
    saved = _install(model, plan)
    if cp is not None:
        from .distributed.model import install as install_cp

        try:
            saved.after.append(install_cp(model, cp, lambda obj, name, value: _set(saved, obj, name, value)))
        except BaseException:
            _restore(model, saved)
            raise
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
    An ``attnkit.Plan`` (``attnkit.plan(profile)``) is also accepted: its per-layer
    prefill methods become the layer plan, ``model.attnkit_plan`` holds it (roles per KV
    head), and with a budget ``model.generate`` gets the plan's per-head cache
    (``Plan.cache_args``: ``duo`` with its retrieval heads) until ``unpatch``.
    Applying again replaces the plan; ``unpatch`` returns to the model as it was before
    the first ``apply``.
    """
    previous = getattr(model, _SAVED_ATTR, None)
    from .head_plan import Plan

    head_plan = None
    if isinstance(plan, Plan):
        head_plan = plan
        head_plan.check_model(model)
        plan = head_plan.layer_plan()
    saved = _install(model, plan)
    if head_plan is not None:
        # per (layer, KV head) roles, visible on the model; the per-head cache through generate
        _set(saved, model, "attnkit_plan", head_plan)
        cache_args = head_plan.cache_args()
        if cache_args is not None:
            from .kvcache import generate_with_cache

            block = generate_with_cache(model, **cache_args)
            block.__enter__()
            saved.after.append(lambda: block.__exit__(None, None, None))
    if previous is not None:
        # Undo to the state before the first apply: the originals are in `previous`.
        saved = _Saved(previous.implementation, previous.attrs, previous.after + saved.after)
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
    return {idx: getattr(group[0], LAYER_ATTR, None) for idx, group in sorted(model_layers.attention_modules(model).items())}
