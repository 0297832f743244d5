"""The mask function transformers calls for a patched model (``AttentionMaskInterface``
entry ``"attnkit"``).

transformers' ``sdpa_mask``, except for one case: a fresh prefill without padding on a
sliding-window layer. There ``sdpa_mask`` materializes a (T, T) boolean mask (1 GiB at
32k tokens, about 5 s to build on 2 cores, and more to read back) that only restates
"causal, within the window". attnkit's layer function knows the window already (the
module passes ``sliding_window``), so this returns None and the layer applies the window
itself (``layer_attention``: its exact ``sliding_window`` kernel, or a mask it builds
for the calls that need one). Any other mask (padding, packed sequences, chunked
attention, custom mask functions, decode with a cache) is ``sdpa_mask``'s, unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

PROBE_WINDOWS = 3  # the probe of the mask function covers 3 windows of queries and keys


def attnkit_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function: Optional[Callable] = None, attention_mask: Optional[torch.Tensor] = None,
                 local_size: Optional[int] = None, allow_is_causal_skip: bool = True, **kwargs: Any
                 ) -> Optional[torch.Tensor]:
    """``sdpa_mask``'s (B, 1, q_length, kv_length) boolean mask, or None where it is plain
    causal attention within a sliding window of ``local_size`` over a fresh, unpadded
    prefill (the layer then applies its own window)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    if local_size is not None and allow_is_causal_skip and _fresh_unpadded_prefill(
            q_length, kv_length, q_offset, kv_offset, attention_mask) and _is_sliding_causal(mask_function, local_size):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def _fresh_unpadded_prefill(q_length: int, kv_length: int, q_offset: Any, kv_offset: Any,
                            attention_mask: Optional[torch.Tensor]) -> bool:
    """Queries and keys are the same positions from 0, and no key is padding."""
    if torch.compiler.is_compiling() or isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        return False
    if q_length != kv_length or q_offset != 0 or kv_offset != 0:
        return False
    if attention_mask is None:
        return True
    return attention_mask.dim() == 2 and attention_mask.shape[-1] == kv_length and bool(attention_mask.all())


def _is_sliding_causal(mask_function: Callable, window: int) -> bool:
    """Whether ``mask_function`` (transformers' index-based form) allows exactly the keys
    i - window < j <= i on a probe of ``PROBE_WINDOWS`` windows (it tells a sliding
    window from chunked attention, which passes the same ``local_size``)."""
    n = PROBE_WINDOWS * window
    rows = torch.tensor(sorted({max(0, r) for w in range(PROBE_WINDOWS + 1) for r in (w * window - 1, w * window,
                                                                                      w * window + 1)} - {n, n + 1}))
    keys = torch.arange(n)  # query rows at each window's edges, against every key of the probe
    try:
        got = mask_function(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), rows[:, None],
                            keys[None, :])
    except Exception:  # a function that is not index-based: leave it to sdpa_mask
        return False
    want = (keys[None, :] <= rows[:, None]) & (keys[None, :] > rows[:, None] - window)
    return isinstance(got, torch.Tensor) and got.shape == want.shape and bool(torch.equal(got.bool(), want))


def allowed_positions(t: int, t_kv: int, causal: bool, window: Optional[int], device: torch.device) -> torch.Tensor:
    """(T, T_kv) bool: causal (bottom-right) or full, within ``window`` (i - w < j <= i
    causal, |i - j| < w not) when given; built with tril only (no int matrices)."""
    ones = torch.ones(t, t_kv, dtype=torch.bool, device=device)
    shift = t_kv - t
    allowed = ones.tril(shift) if causal else ones
    if window is not None:
        allowed = allowed & ~ones.tril(shift - window)
        if not causal:
            allowed = allowed & ones.tril(shift + window - 1)
    return allowed


def window_bites(window: Optional[int], causal: bool, t: int, t_kv: int) -> bool:
    """Whether a layer's own ``window`` hides any key from T queries over T_kv keys (the
    queries are the last T positions)."""
    if window is None:
        return False
    return t_kv > window if causal else max(t, t_kv) > window


def window_mask(window: Optional[int], causal: bool, t: int, k: torch.Tensor) -> Optional[torch.Tensor]:
    """The (1, 1, T, T_kv) boolean mask of a layer's ``window`` where no mask came and the
    window bites (attnkit_mask leaves it out), else None. k: (B, Hkv, T_kv, D)."""
    if window is None or not window_bites(window, causal, t, k.shape[2]):
        return None
    return allowed_positions(t, k.shape[2], causal and t > 1, window, k.device)[None, None]
