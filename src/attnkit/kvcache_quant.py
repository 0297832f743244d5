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
(``from_padded``, ``append``), independently of the others, so eviction and batch
reordering (beam search) move codes with their scale and nothing is re-quantized.
Attention reads codes as the model dtype (exact: |code| <= 127) and applies the scales to
the scores and probabilities (``operand``); those converted codes are a transient of the
layer's pool size in the model dtype, freed after the layer's attention (PyTorch has no
matmul of float queries with int8 keys; a fused kernel would avoid it).
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
    """Full-precision page pool: ``data`` (Npages, P, D) in the model dtype.

    A pool's storage is its ``parts`` (tensors of Npages x P slots); a slot's raw content
    (``take`` / ``put``: one row of each part) is what moves on eviction and batch
    reordering, copied as is; ``encode`` / ``decode`` convert between raw slots and values."""

    bits: Optional[int] = None

    def __init__(self, data: torch.Tensor) -> None:
        self.parts = [data]
        self.dim, self.dtype = data.shape[-1], data.dtype

    @staticmethod
    def new(pages: int, page: int, like: torch.Tensor, bits: Optional[int] = None) -> "Pool":
        """An empty pool of ``pages`` pages of ``page`` slots, D and dtype of ``like`` (.., D)."""
        if bits is None:
            return Pool(like.new_zeros(pages, page, like.shape[-1]))
        return QuantPool.empty(pages, page, like.shape[-1], like.dtype, like.device, bits)

    def like(self, pages: int) -> "Pool":
        """An empty pool of the same kind (page size, D, dtype, bits) with ``pages`` pages."""
        return Pool(self.parts[0].new_zeros(pages, *self.parts[0].shape[1:]))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Values (n, D) -> raw slots (one (n, ...) tensor per part)."""
        return [x.to(self.dtype)]

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Raw slots (..., ...) -> values (..., D) in the model dtype."""
        return raw[0]

    def take(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Raw content of the slots ``idx`` (...) (flat: page * P + slot)."""
        return [t.view(-1, *t.shape[2:])[idx] for t in self.parts]

    def put(self, dest: torch.Tensor, raw: list[torch.Tensor]) -> None:
        """Slots ``dest`` (n,) (flat) get the raw content ``raw``."""
        for t, r in zip(self.parts, raw):
            t.view(-1, *t.shape[2:])[dest] = r

    def write(self, dest: torch.Tensor, x: torch.Tensor) -> None:
        """Slots ``dest`` (n,) get the values x (n, D) (quantized in a ``QuantPool``)."""
        self.put(dest, self.encode(x))

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        """(..., D) in the model dtype: the values of slots ``idx`` (...) (dequantized)."""
        return self.decode(self.take(idx))

    def move(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.put(dst, self.take(src))

    def grow(self, more: int) -> None:
        extra = self.like(more)
        self.parts = [torch.cat([t, e]) for t, e in zip(self.parts, extra.parts)]

    def operand(self, dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(pages (Npages, P, D) in ``dtype``, per-slot scale (Npages, P) float32 or None):
        the slot values are ``pages * scale[..., None]``."""
        return self.parts[0].to(dtype), None

    def tensors(self) -> list[torch.Tensor]:
        return list(self.parts)


class QuantPool(Pool):
    """Quantized page pool: parts ``codes`` (int8 (Npages, P, D) at 8 bits, uint8 (Npages,
    P, ceil(D / 2)) at 4) and ``scale`` (Npages, P) float32 (see the module docstring)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dim: int, dtype: torch.dtype, bits: int) -> None:
        self.parts, self.dim, self.dtype, self.bits = [codes, scale], dim, dtype, bits
        self.qmax = (1 << (bits - 1)) - 1

    @classmethod
    def empty(cls, pages: int, page: int, dim: int, dtype: torch.dtype, device: torch.device,
              bits: int) -> "QuantPool":
        width, code_dtype = (dim, torch.int8) if bits == 8 else ((dim + 1) // 2, torch.uint8)
        codes = torch.zeros(pages, page, width, dtype=code_dtype, device=device)
        if bits == 4:
            codes.fill_(0x88)  # code 0 in both nibbles
        return cls(codes, torch.zeros(pages, page, dtype=torch.float32, device=device), dim, dtype, bits)

    def like(self, pages: int) -> "QuantPool":
        return QuantPool.empty(pages, self.parts[0].shape[1], self.dim, self.dtype, self.parts[0].device, self.bits)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (n, D) -> [codes (n, width), scale (n,) float32]."""
        x = x.float()
        scale = x.abs().amax(dim=-1) / self.qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (x / safe[:, None]).round().clamp(-self.qmax, self.qmax)
        if self.bits == 8:
            return [codes.to(torch.int8), scale]
        return [pack_codes((codes + 8).to(torch.uint8), 4), scale]

    def codes_of(self, packed: torch.Tensor) -> torch.Tensor:
        """Stored codes (..., width) -> signed codes (..., D) (int8 at 8 bits, int16 at 4)."""
        if self.bits == 8:
            return packed
        return unpack_codes(packed, 4, self.dim).to(torch.int16) - 8

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        codes, scale = raw
        return (self.codes_of(codes).float() * scale[..., None]).to(self.dtype)

    def operand(self, dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.codes_of(self.parts[0]).to(dtype), self.parts[1]
