"""What a transformers model's attention layers are, as ``attnkit.patch`` needs to know:
which modules attend, which are cross-attention, which have their own sliding window,
and what an architecture passes that attnkit's sparse methods cannot take (a logit
soft-cap, an additive position bias) or that attnkit cannot run at all (learned sinks).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

# Attribute names of cross-attention modules in transformers' encoder-decoder models
# (BART / mBART / Marian / Whisper: encoder_attn; T5 family: EncDecAttention; BERT as a
# decoder: crossattention; others: cross_attn / cross_attention).
CROSS_ATTENTION_NAMES = frozenset({"encoder_attn", "EncDecAttention", "crossattention", "cross_attn", "cross_attention"})


def attention_modules(model: torch.nn.Module) -> dict[int, list[torch.nn.Module]]:
    """{layer_idx: modules that carry that int ``layer_idx``} (attention modules, and
    sometimes their decoder layers); an error when the model has none."""
    found: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int):
            found.setdefault(idx, []).append(module)
    if not found:
        raise ValueError(f"{type(model).__name__} has no modules with a `layer_idx`; attnkit cannot plan its layers")
    return found


def cross_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The cross-attention modules (decoder queries over encoder keys) of ``model``."""
    return [module for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in CROSS_ATTENTION_NAMES or getattr(module, "is_cross_attention", False) is True]


def own_window(module: torch.nn.Module) -> Optional[int]:
    """The layer's own sliding window (keys i - w < j <= i), or None for full attention:
    the module's ``sliding_window`` (Gemma, Qwen2, ModernBERT), else a config-wide
    ``sliding_window`` when the config has no per-layer ``layer_types`` (Mistral)."""
    window = getattr(module, "sliding_window", None)
    if isinstance(window, int) and not isinstance(window, bool):
        return window
    config = getattr(module, "config", None)
    if config is None or getattr(config, "layer_types", None) is not None or hasattr(module, "sliding_window"):
        return None
    window = getattr(config, "sliding_window", None)
    use = getattr(config, "use_sliding_window", True)
    return window if isinstance(window, int) and use else None


def exact_only_reason(model: torch.nn.Module) -> Optional[str]:
    """Why the model's attention cannot run a sparse method (it can run exactly), or None."""
    if any(getattr(m, "has_relative_attention_bias", False) for m in model.modules()):
        return "its attention adds a learned relative position bias to the logits (position_bias, T5 family)"
    return None


def softcap_of(model: torch.nn.Module) -> Optional[float]:
    """The model's attention logit soft-cap (Gemma 2's ``attn_logit_softcapping``), or None."""
    cap = getattr(getattr(model, "config", None), "attn_logit_softcapping", None)
    return float(cap) if cap else None


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why attnkit cannot run the model's attention at all, or None."""
    for name, module in model.named_modules():
        sinks = getattr(module, "sinks", None)
        if isinstance(sinks, torch.nn.Parameter):
            return (f"its attention ({name}) has learned attention sinks passed as `s_aux`, "
                    "which attnkit's kernels do not implement")
    return None


def describe(spec: Any, window: Optional[int], cross: bool, exact_reason: Optional[str],
             softcap: Optional[float] = None) -> str:
    """What one layer module runs, in words: ``exact``, ``sliding_window(512)``,
    ``streaming(sink=4, window=8) within window 16``, ..."""
    if cross:
        return "exact (cross-attention)"
    if softcap is not None:
        name = "exact" if spec is None or spec.name == "full" else describe(spec, None, False, None)
        within = "" if window is None else f" within the layer's own window of {window}"
        return f"{name}{within} (soft-capped logits: exact math over the allowed set, dense cost)"
    name = None if spec is None else spec.name
    fields = "" if spec is None else ", ".join(f"{k}={v}" for k, v in spec.config.items())
    method = None if name is None else f"{name}({fields})" if fields else name
    if exact_reason is not None:
        return "exact" if window is None else f"exact within the layer's own window of {window}"
    if name is None or name == "full":
        base = "exact" if name is None else method
        return base if window is None else f"{base} -> sliding_window({window}) (the layer's own window, exact kernel)"
    return method if window is None else f"{method} within the layer's own window of {window}"
