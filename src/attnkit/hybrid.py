"""attnkit's linear kernels inside transformers' hybrid models (linear + softmax layers).

transformers runs the linear-attention layers of its hybrid models with pure-PyTorch
fallbacks when fla / Triton is absent (always on the CPU): module-level functions of the
modeling file that the layer's ``forward`` calls by name, not through an extension point.
``attnkit.patch`` swaps those names for adapters that call attnkit's kernels
(``methods/linear/delta_rule.py``) with the same arguments and results — layout
(B, N, H, D) in and out, ``use_qk_l2norm_in_kernel``, ``chunk_size``, the initial state
and the final state that transformers' cache keeps — and puts the originals back on exit.

The swap is per model although the names are per modeling file: a patched layer's
``forward`` is wrapped to mark itself active (a ContextVar), and the adapter runs
attnkit only inside an active layer; any other call (an unpatched model of the same
architecture) goes to transformers' original. The names are swapped while at least one
model of the architecture is patched (a count), so nested and overlapping patches restore
correctly. A layer without such functions (MiniMax's lightning attention, one loop in its
``forward``) gets its ``forward`` replaced on the instance instead.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .methods.linear import delta_rule

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("attnkit_hybrid_active", default=False)


@dataclass(frozen=True)
class HybridLayer:
    """One linear-attention layer class of a transformers model and the functions it calls.

    module: the modeling file; layer: the layer class name; method: the attnkit method it
    runs; chunk / recurrent: the names of transformers' functions -> the names of attnkit's
    kernels in ``methods/linear/delta_rule.py`` (looked up at each call)."""

    module: str
    layer: str
    method: str
    chunk: Optional[tuple[str, str]] = None
    recurrent: Optional[tuple[str, str]] = None
    forward: Optional[Callable[[torch.nn.Module], Callable]] = None  # else: the layer's whole forward


def _minimax_forward(module: torch.nn.Module) -> Callable:
    """``MiniMaxLightningAttention.forward`` with attnkit's ``lightning`` method in place of
    its block loop (prefill) and token loop (a cached continuation).

    Same computation: qkv = act(qkv_proj(x)), padded positions zeroed; per head the decay
    exp(-slope_rate) of the module (MiniMax's ALiBi slopes times its per-layer factor),
    unscaled; the state S (B, H, D, D) read from and written to the cache's linear cache
    (kept in the value dtype, as transformers keeps it); then norm, sigmoid output gate
    and out_proj. transformers runs its token loop for any continuation of a cached
    state; attnkit runs the chunked form from that state (N > 1) or the recurrent one."""
    modeling = importlib.import_module(type(module).__module__)

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        from . import api
        from .methods.linear import KVState

        b, n, _ = hidden_states.shape
        h, d = module.num_attention_heads, module.head_dim
        qkv = module.act_fn(module.qkv_proj(hidden_states))
        qkv = modeling.apply_mask_to_padding_states(qkv, attention_mask)
        q, k, v = torch.split(qkv.reshape(b, n, h, 3 * d), d, dim=3)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        cached = None if past_key_values is None else past_key_values.get_linear_cache(module.layer_idx)
        state = None if cached is None or isinstance(cached, list) else KVState(cached.float())
        # the module's slopes are lightning's 2^(-8(h+1)/H) times MiniMax's per-layer factor: decay_scale
        decay_scale = float(module.slope_rate.flatten()[0]) * 2.0 ** (8.0 / h)
        out, state = api.attention(q, k, v, method="lightning", causal=True, decay_scale=decay_scale,
                                   initial_state=state, return_state=True)
        out = out.transpose(1, 2).reshape(b, n, h * d).to(hidden_states.dtype)
        out = module.norm(out)
        out = torch.sigmoid(module.output_gate(hidden_states)) * out
        out = module.out_proj(out)
        s = state.S.to(v.dtype)
        if past_key_values is not None:
            past_key_values.set_linear_cache(module.layer_idx, s)
        return out, s

    return forward


_TF = "transformers.models"
_GDN = (("torch_chunk_gated_delta_rule", "gated_delta_rule_chunk"),
        ("torch_recurrent_gated_delta_rule", "gated_delta_rule_recurrent"))

# OLMo-hybrid's beta may reach 2 (linear_allow_neg_eigval): the kernels take it as given
HYBRID_LAYERS = (
    HybridLayer(f"{_TF}.qwen3_next.modeling_qwen3_next", "Qwen3NextGatedDeltaNet", "gated_delta", *_GDN),
    HybridLayer(f"{_TF}.qwen3_5.modeling_qwen3_5", "Qwen3_5GatedDeltaNet", "gated_delta", *_GDN),
    HybridLayer(f"{_TF}.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeGatedDeltaNet", "gated_delta", *_GDN),
    HybridLayer(f"{_TF}.olmo_hybrid.modeling_olmo_hybrid", "OlmoHybridGatedDeltaNet", "gated_delta", *_GDN),
    HybridLayer(f"{_TF}.kimi_linear.modeling_kimi_linear", "KimiLinearDeltaAttention", "kda",
                ("chunk_kimi_delta_attention", "kda_chunk"),
                ("recurrent_kimi_delta_attention", "kda_recurrent")),
    HybridLayer(f"{_TF}.minimax.modeling_minimax", "MiniMaxLightningAttention", "lightning",
                forward=_minimax_forward),
)

_count: dict[str, int] = {}  # modeling file -> number of patched models using it
_originals: dict[tuple[str, str], Callable] = {}


def _adapter(original: Callable, kernel: str, chunked: bool) -> Callable:
    """transformers' function -> attnkit's kernel inside an active layer, else ``original``.

    Arguments are bound to the original's own signature (positional or keyword, its
    defaults): query, key (B, N, Hk, Dk); value (B, N, Hv, Dv); g (B, N, Hv) or
    (B, N, Hv, Dk); beta (B, N, Hv); initial_state (B, Hv, Dk, Dv); chunk_size (chunked
    only); output_final_state; use_qk_l2norm_in_kernel. Returns (out (B, N, Hv, Dv) in the
    query's dtype, the final state float32 (B, Hv, Dk, Dv) or None), as transformers does."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def run(*args: Any, **kwargs: Any):
        # packed sequences (cu_seqlens): transformers' own path decides (it refuses them without fla)
        if not _ACTIVE.get() or kwargs.get("cu_seqlens") is not None:
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        p = bound.arguments
        # transformers computes in float32 whatever the input dtype; so does this
        q, k, v, g, beta = (p[name].transpose(1, 2).float() for name in ("query", "key", "value", "g", "beta"))
        s0 = p.get("initial_state")
        kw = dict(initial_state=None if s0 is None else s0.float(), use_qk_l2norm=bool(p["use_qk_l2norm_in_kernel"]))
        if chunked:
            kw["chunk_size"] = int(p["chunk_size"])
        out, state = getattr(delta_rule, kernel)(q, k, v, g, beta, **kw)
        out = out.transpose(1, 2).to(p["query"].dtype).contiguous()
        return out, (state if p["output_final_state"] else None)

    run.attnkit_adapter = True
    return run


def _wrap_forward(module: torch.nn.Module) -> Callable:
    """The layer's forward, marking attnkit active while it runs."""
    forward = module.forward

    @functools.wraps(forward)
    def active_forward(*args: Any, **kwargs: Any):
        token = _ACTIVE.set(True)
        try:
            return forward(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return active_forward


def hybrid_layers(model: torch.nn.Module) -> dict[torch.nn.Module, HybridLayer]:
    """The model's linear-attention layers that attnkit runs: {module: its HybridLayer}."""
    found = {}
    for module in model.modules():
        for spec in HYBRID_LAYERS:
            if type(module).__name__ == spec.layer and type(module).__module__ == spec.module:
                found[module] = spec
    return found


def install(model: torch.nn.Module, set_attr: Callable[[Any, str, Any], None]) -> Callable[[], None]:
    """Route the model's linear-attention layers to attnkit; ``set_attr(obj, name, value)``
    records per-module changes (undone by the caller). Returns the undo of the swapped
    module-level names (call it once, after the caller's undo)."""
    layers = hybrid_layers(model)
    for module, spec in layers.items():
        set_attr(module, "forward", spec.forward(module) if spec.forward else _wrap_forward(module))
    layers = {module: spec for module, spec in layers.items() if spec.forward is None}
    files = sorted({spec.module for spec in layers.values()})
    for name in files:
        if _count.get(name, 0) == 0:
            modeling = importlib.import_module(name)
            for spec in HYBRID_LAYERS:
                if spec.module != name or spec.forward is not None:
                    continue
                for (fn_name, kernel), chunked in ((spec.chunk, True), (spec.recurrent, False)):
                    original = getattr(modeling, fn_name)
                    _originals[(name, fn_name)] = original
                    setattr(modeling, fn_name, _adapter(original, kernel, chunked))
        _count[name] = _count.get(name, 0) + 1

    def undo() -> None:
        for name in files:
            _count[name] -= 1
            if _count[name] == 0:
                modeling = importlib.import_module(name)
                for (file, fn_name), original in list(_originals.items()):
                    if file == name:
                        setattr(modeling, fn_name, original)
                        del _originals[(file, fn_name)]

    return undo


# words in the class names of recurrent / state-space layers (Mamba, short convolutions,
# linear attention): such a layer that attnkit does not know keeps a state KVCache cannot vouch for
_RECURRENT_WORDS = ("Mamba", "Mixer", "ShortConv", "GatedDeltaNet", "DeltaAttention", "Lightning", "Rwkv", "SSM")


def cache_unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why ``attnkit.KVCache`` cannot run this model, naming the layers, or None.

    The linear layers attnkit knows (``HYBRID_LAYERS``: Qwen3-Next, Qwen3.5, OLMo-hybrid,
    Kimi-Linear, MiniMax) keep their conv / recurrent states in ``KVCache``
    (``StateLayer``) and the softmax layers get the policy; a model with other recurrent
    layers (Mamba hybrids such as Jamba, short-convolution models such as LFM2) is refused."""
    known = hybrid_layers(model)
    other = sorted({type(m).__name__ for m in model.modules()
                    if m not in known and "DecoderLayer" not in type(m).__name__
                    and any(word in type(m).__name__ for word in _RECURRENT_WORDS)})
    if other:
        families = ", ".join(sorted({spec.layer for spec in HYBRID_LAYERS}))
        return (f"{type(model).__name__} has recurrent layers attnkit's KVCache does not hold ({', '.join(other)}); "
                f"the hybrid layers it holds are {families}")
    return None


def describe(spec: HybridLayer) -> str:
    """What a linear-attention layer runs, in words."""
    if spec.forward is not None:
        return f"{spec.method} (attnkit, in place of transformers' {spec.layer}.forward loops)"
    return f"{spec.method} (attnkit delta-rule kernels for transformers' {spec.chunk[0]} / {spec.recurrent[0]})"
