"""KIVI: 2/4-bit asymmetric KV-cache quantization, keys per channel, values per token.

Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
arXiv:2402.02750 (2024). Rule: keys are quantized per channel (each channel's
``group_size`` consecutive tokens share a scale and zero-point), values per token (each
token's ``group_size`` consecutive channels share one); asymmetric uniform quantization
with ``bits`` (2 or 4; 8 also accepted): ``scale = (max - min) / (2**bits - 1)``,
``zero = min``, ``code = round((x - zero) / scale)``. A full-precision window of recent
tokens is kept: keys wait in full precision until ``residual`` of them have accumulated,
then that whole chunk is quantized (``residual`` is a multiple of ``group_size``, so key
groups never straddle); values keep exactly the ``residual`` newest tokens in full
precision and each older token is quantized as it leaves the window (KIVI's code does
both). Attention runs over the dequantized keys/values (dequantize on attend).

Storage is real: codes are packed into uint8 (4 per byte at 2 bits), scales and zeros in
the model dtype, so ``KVCache.nbytes()`` shows the saving. Nothing is evicted; the policy
has no budget (``KVCache("quantized", bits=2)``); ``compose`` can add eviction.
Deviations: KIVI's fused Triton/CUDA kernels are not used (dequantize then attend, in
PyTorch); the dequantized read-out exists only during the layer's attention. When the
head dim is not a multiple of ``group_size``, value groups are ``min(group_size, D)``
channels and the last group is zero-padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ...registry import register
from .base import CachePolicy, LayerView, nbytes_of
from .quantize import dequantize_channelwise, dequantize_tokenwise, quantize_channelwise, quantize_tokenwise

BITS = (2, 4, 8)


class KIVIStore:
    """One layer's KIVI storage: packed key codes (per-channel groups over tokens),
    packed value codes (per-token groups over channels) and full-precision residuals."""

    def __init__(self, bits: int, group: int, residual: int) -> None:
        self.bits, self.group, self.residual = bits, group, residual
        self.k_fp: Optional[torch.Tensor] = None  # (B, H, Tr, D) full precision
        self.v_fp: Optional[torch.Tensor] = None
        self.kq: Optional[torch.Tensor] = None  # (B, H, Tq, ceil(D * bits / 8)) uint8
        self.k_scale: Optional[torch.Tensor] = None  # (B, H, Tq / group, D)
        self.k_zero: Optional[torch.Tensor] = None
        self.vq: Optional[torch.Tensor] = None  # (B, H, Tv, ceil(Dp * bits / 8)) uint8
        self.v_scale: Optional[torch.Tensor] = None  # (B, H, Tv, Dp / gv)
        self.v_zero: Optional[torch.Tensor] = None

    # quantizers (the shared ones of common.py, grouped the KIVI way)
    def quantize_keys(self, k: torch.Tensor):
        b, h, m, d = k.shape
        packed, scale, zero = quantize_channelwise(k.reshape(b, h, m // self.group, self.group, d), self.bits)
        return packed.reshape(b, h, m, -1), scale[..., 0, :], zero[..., 0, :]

    def dequantize_keys(self, packed, scale, zero, d: int) -> torch.Tensor:
        b, h, m, _ = packed.shape
        grouped = packed.reshape(b, h, m // self.group, self.group, -1)
        out = dequantize_channelwise(grouped, scale[..., None, :], zero[..., None, :], self.bits, d)
        return out.reshape(b, h, m, d)

    def quantize_values(self, v: torch.Tensor):
        return quantize_tokenwise(v, self.bits, self.group)

    def dequantize_values(self, packed, scale, zero, d: int) -> torch.Tensor:
        return dequantize_tokenwise(packed, scale, zero, self.bits, d, self.group)

    # the storage hook
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_fp = k if self.k_fp is None else torch.cat([self.k_fp, k], dim=2)
        self.v_fp = v if self.v_fp is None else torch.cat([self.v_fp, v], dim=2)
        m = (self.k_fp.shape[2] // self.residual) * self.residual
        if m:
            packed, scale, zero = self.quantize_keys(self.k_fp[:, :, :m])
            self.kq, self.k_scale, self.k_zero = _cat(self.kq, packed), _cat(self.k_scale, scale), _cat(self.k_zero, zero)
            self.k_fp = self.k_fp[:, :, m:].clone()  # a copy: a slice would keep the whole old storage alive
        m = self.v_fp.shape[2] - self.residual
        if m > 0:
            packed, scale, zero = self.quantize_values(self.v_fp[:, :, :m])
            self.vq, self.v_scale, self.v_zero = _cat(self.vq, packed), _cat(self.v_scale, scale), _cat(self.v_zero, zero)
            self.v_fp = self.v_fp[:, :, m:].clone()

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.k_fp, self.v_fp
        if self.kq is not None:
            deq = self.dequantize_keys(self.kq, self.k_scale, self.k_zero, keys.shape[-1])
            keys = torch.cat([deq.to(keys.dtype), keys], dim=2)
        if self.vq is not None:
            deq = self.dequantize_values(self.vq, self.v_scale, self.v_zero, values.shape[-1])
            values = torch.cat([deq.to(values.dtype), values], dim=2)
        return keys, values

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in (self.k_fp, self.v_fp, self.kq, self.k_scale, self.k_zero, self.vq, self.v_scale,
                            self.v_zero) if x is not None]

    def observe(self, view: LayerView, q: torch.Tensor, query_positions: torch.Tensor) -> None:
        """KIVI decides nothing from the queries."""

    def nbytes(self) -> int:
        return nbytes_of(self.tensors())

    def apply_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in ("k_fp", "v_fp", "kq", "k_scale", "k_zero", "vq", "v_scale", "v_zero"):
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, fn(x))


def _cat(old: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=2)


@register("quantized", family="kv_cache",
          paper="KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
          arxiv="2402.02750", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class KIVI(CachePolicy):
    """Keeps every token, quantized (keys per channel, values per token) with a
    full-precision recent window; no eviction, no budget."""

    mode = "store"

    @dataclass
    class Config:
        bits: int = 2
        group_size: int = 32
        residual: int = 128

    def check_config(self) -> None:
        c = self.config
        if c.bits not in BITS:
            raise ValueError(f"quantized: bits must be one of {BITS}, got {c.bits!r}")
        if not isinstance(c.group_size, int) or c.group_size < 1:
            raise ValueError(f"quantized: group_size must be a positive int, got {c.group_size!r}")
        if not isinstance(c.residual, int) or c.residual < c.group_size or c.residual % c.group_size:
            raise ValueError(f"quantized: residual must be a positive multiple of group_size ({c.group_size}), "
                             f"got {c.residual!r}")

    def make_store(self, layer_idx: int) -> KIVIStore:
        return KIVIStore(self.config.bits, self.config.group_size, self.config.residual)
