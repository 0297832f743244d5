"""The page pools of ``RaggedKV``: full precision (``Pool``) or quantized (``QuantPool``,
``KVCache(..., kv_bits=8)`` / ``kv_bits=4``; docs/kv-cache.md, "Quantized per-head storage").

A pool holds one of a layer's two tensors (keys or values) for every slot of its pages,
(Npages, P, D) logically. ``QuantPool`` stores each slot (one token of one (row, KV head))
as symmetric absmax codes with one float32 scale per slot:

    scale = max_j |x_j| / qmax,   code_j = round(x_j / scale) in [-qmax, qmax],   x_j ~ code_j * scale

``qmax`` = 127 at 8 bits (codes int8 (Npages, P, D)), 7 at 4 bits (codes + 8 packed two
per byte, uint8 (Npages, P, ceil(D / 2))). The error of an element is at most scale / 2
(absmax / 254 at 8 bits), since the codes are computed against the scale that is stored.
Scales are float32 whatever the model dtype: 4 bytes per D codes (6% of int8 codes at
D = 64), the bound above holds exactly (a bf16 scale would be off by up to 2**-9 of
itself, as large as the int8 rounding), and scores are scaled in float32.

Per token (not per channel as KIVI's keys): a slot is quantized once, when it is written
(``from_padded``, ``append``), independently of the others, so eviction moves codes with
their scale and nothing is re-quantized. Attention reads codes as the model dtype (exact:
|code| <= 127) and applies the scales to the scores and probabilities (``operand``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .methods.kvcache.quantize import pack_codes, unpack_codes

KV_BITS = (8, 4)  # kv_bits of KVCache besides None (full precision)


def check_kv_bits(kv_bits: object) -> Optional[int]:
    """``kv_bits`` if it is None, 8 or 4; a ValueError naming the allowed values otherwise."""
    if kv_bits is None or (type(kv_bits) is int and kv_bits in KV_BITS):
        return kv_bits  # type: ignore[return-value]
    raise ValueError(f"kv_bits must be None (full precision), 8 (int8) or 4 (4-bit codes, two per byte), "
                     f"got {kv_bits!r}")


class Pool:
    """Full-precision page pool: ``data`` (Npages, P, D) in the model dtype."""

    bits: Optional[int] = None

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data
        self.dim, self.dtype = data.shape[-1], data.dtype

    @staticmethod
    def new(pages: int, page: int, like: torch.Tensor, bits: Optional[int] = None) -> "Pool":
        """An empty pool of ``pages`` pages of ``page`` slots, D and dtype of ``like`` (.., D)."""
        if bits is None:
            return Pool(like.new_zeros(pages, page, like.shape[-1]))
        return QuantPool.empty(pages, page, like.shape[-1], like.dtype, like.device, bits)

    def write(self, dest: torch.Tensor, x: torch.Tensor) -> None:
        """Slots ``dest`` (n,) (flat: page * P + slot) get x (n, D)."""
        self.data.view(-1, self.dim)[dest] = x.to(self.dtype)

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        """(..., D) in the model dtype: slots ``idx`` (...) (flat, valid)."""
        return self.data.view(-1, self.dim)[idx]

    def move(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        flat = self.data.view(-1, self.dim)
        flat[dst] = flat[src]

    def grow(self, more: int) -> None:
        self.data = torch.cat([self.data, self.data.new_zeros(more, *self.data.shape[1:])])

    def operand(self, dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(pages (Npages, P, D) in ``dtype``, per-slot scale (Npages, P) float32 or None):
        the slot values are ``pages * scale[..., None]``."""
        return self.data.to(dtype), None

    def tensors(self) -> list[torch.Tensor]:
        return [self.data]


class QuantPool(Pool):
    """Quantized page pool: ``codes`` (int8 (Npages, P, D) at 8 bits, uint8 (Npages, P,
    ceil(D / 2)) at 4), ``scale`` (Npages, P) float32 (see the module docstring)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dim: int, dtype: torch.dtype, bits: int) -> None:
        self.codes, self.scale, self.dim, self.dtype, self.bits = codes, scale, dim, dtype, bits
        self.qmax = (1 << (bits - 1)) - 1

    @classmethod
    def empty(cls, pages: int, page: int, dim: int, dtype: torch.dtype, device: torch.device,
              bits: int) -> "QuantPool":
        width, code_dtype = (dim, torch.int8) if bits == 8 else ((dim + 1) // 2, torch.uint8)
        codes = torch.zeros(pages, page, width, dtype=code_dtype, device=device)
        if bits == 4:
            codes.fill_(0x88)  # code 0 in both nibbles
        return cls(codes, torch.zeros(pages, page, dtype=torch.float32, device=device), dim, dtype, bits)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n, D) -> (codes (n, width), scale (n,) float32)."""
        x = x.float()
        scale = x.abs().amax(dim=-1) / self.qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (x / safe[:, None]).round().clamp(-self.qmax, self.qmax)
        if self.bits == 8:
            return codes.to(torch.int8), scale
        return pack_codes((codes + 8).to(torch.uint8), 4), scale

    def codes_of(self, packed: torch.Tensor) -> torch.Tensor:
        """Stored codes (..., width) -> signed codes (..., D) (int8 at 8 bits, int16 at 4)."""
        if self.bits == 8:
            return packed
        return unpack_codes(packed, 4, self.dim).to(torch.int16) - 8

    def write(self, dest: torch.Tensor, x: torch.Tensor) -> None:
        codes, scale = self.quantize(x)
        self.codes.view(-1, self.codes.shape[-1])[dest] = codes
        self.scale.view(-1)[dest] = scale

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        codes = self.codes_of(self.codes.view(-1, self.codes.shape[-1])[idx])
        return (codes.float() * self.scale.view(-1)[idx][..., None]).to(self.dtype)

    def move(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        flat = self.codes.view(-1, self.codes.shape[-1])
        flat[dst] = flat[src]
        scale = self.scale.view(-1)
        scale[dst] = scale[src]

    def grow(self, more: int) -> None:
        extra = QuantPool.empty(more, self.codes.shape[1], self.dim, self.dtype, self.codes.device, self.bits)
        self.codes = torch.cat([self.codes, extra.codes])
        self.scale = torch.cat([self.scale, extra.scale])

    def operand(self, dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.codes_of(self.codes).to(dtype), self.scale

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale]
