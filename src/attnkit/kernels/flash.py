"""One fused attention call over one tile, forward and backward: the arithmetic every
kernel runs.

A *tile* is a batch of query rows against a batch of keys: q (b, h, r, E), k, v
(b, h, s, E) (any strides, one head size E for all three: the tiled executor pads), an
optional additive mask broadcastable to (b, h, r, s) (finite ``MASKED`` for a masked
pair) and an optional top-left causal rule inside the tile.

- ``tile_forward`` -> (out (b, h, r, E), lse (b, h, r)): softmax attention of the tile's
  pairs and the natural log of its softmax normaliser; a row with no allowed key gets
  lse = -inf (its out is meaningless and is dropped by the merge).
- ``tile_backward``: the tile's share of dq, dk, dv given the *whole* attention of its
  rows (their final out and lse, over every tile they attend to), as FlashAttention's
  backward computes it tile by tile: P = exp(s - lse), dS = P * (dO V^T - rowsum(dO * O)).

On the CPU (float32 / float64 / bfloat16 / float16) both call PyTorch's fused
flash-attention kernels (``aten._scaled_dot_product_flash_attention_for_cpu`` and its
backward), which tile the work in cache-sized blocks and never build the (r, s) scores;
elsewhere a plain matmul version builds the tile's scores (tiles are small by design).
"""

from __future__ import annotations

import torch

# A finite "minus infinity" for additive masks: -inf sends the CPU kernel down a slow path.
MASKED = -1e30
# Below this a row's log-sum-exp came from masked keys only.
EMPTY_LSE = MASKED / 2

_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _fused(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in _FLASH_DTYPES


def tile_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one tile. q: (b, h, r, E); k, v: (b, h, s, E); mask additive or None.

    Returns out (b, h, r, E) and lse (b, h, r) (-inf on rows without an allowed key).
    ``causal`` is top-left aligned (row i sees keys 0..i of the tile).
    """
    if _fused(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    else:
        out, lse = _math_forward(q, k, v, scale, causal, mask)
    return out, lse.masked_fill(lse < EMPTY_LSE, float("-inf"))


def tile_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tile's part of (dq, dk, dv).

    dout, out: (b, h, r, E) the rows' output gradient and *final* output; lse: (b, h, r)
    the rows' final log-sum-exp with +inf on rows that attend to nothing (their P is 0).
    A gradient flowing into lse is folded in by the caller (an extra head column, see
    ``tiled``). Returns dq (b, h, r, E), dk, dv (b, h, s, E).
    """
    if _fused(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )
    return _math_backward(dout, q, k, v, out, lse, scale, causal, mask)


def _scores(q, k, scale, causal, mask):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    if causal:
        r, n = s.shape[-2:]
        s = s.masked_fill(torch.ones(r, n, dtype=torch.bool, device=s.device).triu(1), MASKED)
    return s


def _math_forward(q, k, v, scale, causal, mask):
    s = _scores(q, k, scale, causal, mask)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v), lse


def _math_backward(dout, q, k, v, out, lse, scale, causal, mask):
    p = torch.exp(_scores(q, k, scale, causal, mask) - lse.unsqueeze(-1))
    delta = (dout * out).sum(-1, keepdim=True)
    ds = p * (torch.matmul(dout, v.transpose(-1, -2)) - delta)
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale, torch.matmul(p.transpose(-1, -2), dout)
