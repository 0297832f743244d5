"""Quantization of KV-cache tensors (KIVI, ZipCache): asymmetric uniform quantization in
groups, bit packing, and the channel-wise, token-wise and channel-separable layouts."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_groups(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uniform quantization of x (..., G) over its last dim (one group per row).

    Returns (codes uint8 (..., G) in [0, 2**bits - 1], scale (..., 1), zero (..., 1)) with
    ``x ~ codes * scale + zero`` and ``|x - dequantized| <= scale / 2``.
    """
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((x - lo) / safe).round().clamp(0, levels).to(torch.uint8)
    return codes, scale, lo


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (..., n) of ``bits`` each into (..., n * bits / 8) bytes."""
    per = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    if pad:
        codes = F.pad(codes, (0, pad))
    c = codes.view(*codes.shape[:-1], -1, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: (..., m) bytes -> (..., n) uint8 codes."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)


def quantize_channelwise(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., m, D): one group per channel over the m tokens (KIVI's keys, ZipCache's keys).

    Returns (packed codes (..., m, ceil(D * bits / 8)) uint8, scale (..., 1, D), zero (..., 1, D)).
    """
    codes, scale, zero = quantize_groups(x.transpose(-1, -2), bits)
    return pack_codes(codes.transpose(-1, -2), bits), scale.transpose(-1, -2), zero.transpose(-1, -2)


def dequantize_channelwise(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                           d: int) -> torch.Tensor:
    """Inverse of ``quantize_channelwise`` -> (..., m, D) in the dtype of ``scale``."""
    return unpack_codes(packed, bits, d).to(scale.dtype) * scale + zero


def quantize_tokenwise(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., D): each token's channels in groups of ``min(group, D)`` (the last group
    zero-padded) share a scale and zero-point (KIVI's values).

    Returns (packed codes (..., ceil(Dp * bits / 8)), scale (..., Dp / g), zero (..., Dp / g)).
    """
    d = x.shape[-1]
    g = min(group, d)
    pad = (-d) % g
    xg = F.pad(x, (0, pad)).reshape(*x.shape[:-1], (d + pad) // g, g)
    codes, scale, zero = quantize_groups(xg, bits)
    return pack_codes(codes.reshape(*x.shape[:-1], d + pad), bits), scale[..., 0], zero[..., 0]


def dequantize_tokenwise(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, d: int,
                         group: int) -> torch.Tensor:
    """Inverse of ``quantize_tokenwise`` -> (..., D) in the dtype of ``scale``."""
    g = min(group, d)
    codes = unpack_codes(packed, bits, d + (-d) % g).to(scale.dtype)
    out = codes * scale.repeat_interleave(g, dim=-1) + zero.repeat_interleave(g, dim=-1)
    return out[..., :d]


def quantize_cst(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """Channel-separable tokenwise quantization (ZipCache's CSTQuant) of x (..., m, D):
    divide channel j by ``c_j = sqrt(max_t |x[t, j]|)``, quantize each token over all its
    channels, multiply back on dequantization.

    Returns (packed codes (..., m, ceil(D * bits / 8)), scale (..., m, 1), zero (..., m, 1),
    c (..., 1, D)); the error of element (t, j) is at most ``scale_t * c_j / 2``.
    """
    c = x.abs().amax(dim=-2, keepdim=True).sqrt()
    c = torch.where(c > 0, c, torch.ones_like(c))
    packed, scale, zero = quantize_tokenwise(x / c, bits, x.shape[-1])
    return packed, scale, zero, c


def dequantize_cst(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, c: torch.Tensor, bits: int,
                   d: int) -> torch.Tensor:
    """Inverse of ``quantize_cst`` -> (..., m, D)."""
    return dequantize_tokenwise(packed, scale, zero, bits, d, d) * c
