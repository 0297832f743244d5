"""PyTorch's CPU flash-attention kernel with its log-sum-exp, for any value head size.

The kernel (``aten._scaled_dot_product_flash_attention_for_cpu``) returns the
log-sum-exp that tile merging needs, but wants one head size for q, k and v; models and
users may give values a head size of their own (``validate.check_qkv`` allows it).
"""

from __future__ import annotations

import torch
from torch.nn.functional import pad

_kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def flash_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp on the CPU.

    q: (B, H, Nq, D); k: (B, H, Nk, D); v: (B, H, Nk, Dv); attn_mask: additive, broadcast
    to (B, H, Nq, Nk), or None; causal is top-left aligned. -> (out (B, H, Nq, Dv),
    lse (B, H, Nq)). When D != Dv the shorter side is zero-padded (q and k, or v): the
    scores and the first Dv output columns are unchanged.
    """
    d, dv = q.shape[-1], v.shape[-1]
    if d < dv:
        q, k = pad(q, (0, dv - d)), pad(k, (0, dv - d))
    elif dv < d:
        v = pad(v, (0, d - dv))
    out, lse = _kernel(q, k, v, 0.0, causal, attn_mask=attn_mask, scale=scale)[:2]
    if dv != out.shape[-1]:
        out = out[..., :dv].contiguous()
    return out, lse
