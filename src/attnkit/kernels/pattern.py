"""The pattern a sparse method hands to a kernel.

A pattern says, per (batch, head, query block), which key blocks are computed
(``kv_blocks``) and, inside those blocks, which (query, key) pairs are allowed
(``mask_mod``). The allowed set is exactly: listed block AND mask_mod AND key in range.
Every kernel (CPU gather, FlexAttention, dense SDPA) computes attention over that same
set, so patterns and kernels are independent.

``mask_mod(b, h, q_pos, k_pos) -> bool`` follows FlexAttention's convention with one
difference: ``q_pos`` is the *absolute* position of the query in the key sequence
(``Nk - Nq + i`` for the i-th query), so causality is ``k_pos <= q_pos`` for any Nq.
It must use elementwise tensor ops only (it is called with broadcast index tensors by
the CPU kernel and with scalars under vmap by FlexAttention). ``h`` is the query head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_mod(b: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    return k_pos <= q_pos


def and_mods(*mods: Optional[MaskMod]) -> Optional[MaskMod]:
    """The conjunction of mask mods (None entries are ignored; all None gives None)."""
    live = [m for m in mods if m is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def both(b, h, q_pos, k_pos):
        out = live[0](b, h, q_pos, k_pos)
        for m in live[1:]:
            out = out & m(b, h, q_pos, k_pos)
        return out

    return both


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class BlockPattern:
    """Block-sparse pattern with an element-level rule.

    kv_blocks: LongTensor (Bp, Hp, nQB, K) of key-block indices per query block, sorted
        ascending, padded with -1 at the end; Bp in {1, B}, Hp in {1, Hq}.
    block_q, block_k: block sizes in queries / keys.
    q_len, kv_len: Nq, Nk. Query i sits at absolute position kv_len - q_len + i.
    mask_mod: element rule inside listed blocks (see module doc); None = all pairs of a
        listed block are allowed.
    full_tiles: optional bool (Bp, Hp, nQB, K) aligned with ``kv_blocks``: True where
        every pair of the tile is allowed, so kernels may skip the element rule there.
        Only a speed hint: False is always correct.
    position_only: True when ``mask_mod`` ignores its batch and head arguments (a rule of
        positions alone), so kernels may evaluate it once for all heads. False is always
        correct.
    """

    kv_blocks: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    mask_mod: Optional[MaskMod] = None
    full_tiles: Optional[torch.Tensor] = None
    position_only: bool = False

    @property
    def q_offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def num_q_blocks(self) -> int:
        return cdiv(self.q_len, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return cdiv(self.kv_len, self.block_k)

    def dense_mask(self, batch: int = 1, heads: int = 1) -> torch.Tensor:
        """(max(Bp, batch), max(Hp, heads), Nq, Nk) bool: the exact allowed set.

        Builds an Nq x Nk tensor: for tests, short sequences and the dense backend only.
        """
        bp, hp = self.kv_blocks.shape[:2]
        batch, heads = max(bp, batch), max(hp, heads)
        device = self.kv_blocks.device
        listed = block_mask_from_lists(self.kv_blocks, self.num_kv_blocks)  # (Bp, Hp, nQB, nKB)
        listed = listed.repeat_interleave(self.block_q, dim=2)[:, :, : self.q_len]
        listed = listed.repeat_interleave(self.block_k, dim=3)[:, :, :, : self.kv_len]
        allowed = listed.expand(batch, heads, self.q_len, self.kv_len)
        if self.mask_mod is not None:
            b = torch.arange(batch, device=device)[:, None, None, None]
            h = torch.arange(heads, device=device)[None, :, None, None]
            q_pos = torch.arange(self.q_len, device=device)[None, None, :, None] + self.q_offset
            k_pos = torch.arange(self.kv_len, device=device)[None, None, None, :]
            allowed = allowed & self.mask_mod(b, h, q_pos, k_pos)
        return allowed.expand(batch, heads, self.q_len, self.kv_len)


def block_mask_from_lists(kv_blocks: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """(..., nQB, K) padded index lists -> (..., nQB, nKB) bool block mask."""
    shape = kv_blocks.shape[:-1] + (num_kv_blocks + 1,)
    out = torch.zeros(shape, dtype=torch.bool, device=kv_blocks.device)
    idx = torch.where(kv_blocks >= 0, kv_blocks, num_kv_blocks)
    out.scatter_(-1, idx, True)
    return out[..., :num_kv_blocks]


def lists_from_block_mask(block_mask: torch.Tensor) -> torch.Tensor:
    """(..., nQB, nKB) bool -> (..., nQB, K) ascending index lists padded with -1, K = max count."""
    n = block_mask.shape[-1]
    counts = block_mask.sum(-1)
    width = max(int(counts.max().item()) if counts.numel() else 0, 1)
    ar = torch.arange(n, device=block_mask.device)
    key = torch.where(block_mask, ar, ar + n)  # listed blocks first, in ascending order
    order = key.sort(dim=-1).values[..., :width]
    slot = torch.arange(width, device=block_mask.device)
    return torch.where(slot < counts[..., None], order, torch.full_like(order, -1))


def tile_ranges(
    q_len: int, kv_len: int, block_q: int, block_k: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """First/last absolute query position of each query block, shape (nQB, 1), and
    first/last key position of each key block, shape (1, nKB) (last ones clipped to the
    sequence; query i of Nq sits at Nk - Nq + i)."""
    offset = kv_len - q_len
    q_lo = torch.arange(cdiv(q_len, block_q), device=device) * block_q
    q_hi = torch.clamp(q_lo + block_q - 1, max=q_len - 1)
    k_lo = torch.arange(cdiv(kv_len, block_k), device=device) * block_k
    k_hi = torch.clamp(k_lo + block_k - 1, max=kv_len - 1)
    return (q_lo + offset)[:, None], (q_hi + offset)[:, None], k_lo[None, :], k_hi[None, :]


def slots_of(block_mask: torch.Tensor, kv_blocks: torch.Tensor) -> torch.Tensor:
    """Read a (..., nQB, nKB) block mask at the slots of padded lists (..., nQB, K)."""
    while block_mask.dim() < kv_blocks.dim():
        block_mask = block_mask.unsqueeze(0)
    block_mask = block_mask.expand(*kv_blocks.shape[:-1], block_mask.shape[-1])
    return block_mask.gather(-1, kv_blocks.clamp(min=0)) & (kv_blocks >= 0)
