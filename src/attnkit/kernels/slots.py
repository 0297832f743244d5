"""Key-slot kernel: each query block attends to its own list of kept keys.

The pattern of ``hip`` and ``sea`` (``KeySlots``): per batch, KV head and query block of
``block`` queries, S key positions (ascending, padded slots invalid). Query block i of
query head h attends to the valid keys ``tokens[b, h // group, i]``, minus the pairs an
``exclude`` rule leaves to another part of the method (its exact anchors). A key may sit
in the slots of many blocks, so the keys are gathered per group of blocks (never all
slots at once) and each group is one fused call with the blocks as a batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .pattern import BlockPattern, MaskMod, cdiv, lists_from_block_mask
from .tiled import Call, GatheredKeys, Geometry, Plan, RowSel, additive

GROUP_ELEMS = 1 << 21  # elements of gathered K/V + mask per call (8 MiB fp32: recycled by malloc)


@dataclass
class KeySlots:
    """Kept keys of every (batch, KV head, query block).

    tokens, valid: (B, Hkv, nQB, S) key positions and slot validity (invalid slots hold
    any position); block: queries per block; q_len, kv_len: Nq, Nk (query i sits at key
    position Nk - Nq + i); exclude: ``rule(b, h, q_pos, k_pos)`` True for pairs computed
    elsewhere (positions absolute, h the query head), or None.
    """

    tokens: torch.Tensor
    valid: torch.Tensor
    block: int
    q_len: int
    kv_len: int
    exclude: Optional[MaskMod] = None

    @property
    def num_blocks(self) -> int:
        return cdiv(self.q_len, self.block)

    def to_block_pattern(self, q_heads: int) -> BlockPattern:
        """The same allowed set as a BlockPattern in the original order (for stats, tests
        and the generic kernels): the key blocks holding a kept key, with a membership rule.
        Builds a (B, Hkv, nQB, Nk) bool table: not for long sequences on the fast path."""
        b, hkv, nqb, _ = self.tokens.shape
        group, nk, bs = q_heads // hkv, self.kv_len, self.block
        member = torch.zeros(b, hkv, nqb, nk + 1, dtype=torch.bool, device=self.tokens.device)
        member.scatter_(-1, torch.where(self.valid, self.tokens, nk), True)
        member = member[..., :nk]
        nkb = cdiv(nk, bs)
        tiles = torch.nn.functional.pad(member, (0, nkb * bs - nk)).view(b, hkv, nqb, nkb, bs).any(-1)
        lists = lists_from_block_mask(tiles.repeat_interleave(group, dim=1))
        off, exclude = self.kv_len - self.q_len, self.exclude

        def kept(bb, h, q_pos, k_pos):
            q_blk = ((q_pos - off) // bs).clamp(0, nqb - 1)
            ok = member[bb % b, (h // group) % hkv, q_blk, k_pos.clamp(0, nk - 1)]
            return ok if exclude is None else ok & ~exclude(bb, h, q_pos, k_pos)

        return BlockPattern(kv_blocks=lists, block_q=bs, block_k=bs, q_len=self.q_len, kv_len=nk, mask_mod=kept)

    def count_pairs(self, q_heads: int) -> int:
        """Allowed (query, key) pairs over all batches and query heads (exclusions applied)."""
        total = 0
        hkv = self.tokens.shape[1]
        group = q_heads // hkv
        for b in range(self.tokens.shape[0]):
            for i in range(self.num_blocks):
                q0, q1 = i * self.block, min(self.q_len, (i + 1) * self.block)
                q_pos = torch.arange(q0, q1, device=self.tokens.device)[:, None] + (self.kv_len - self.q_len)
                keep = self.valid[b, :, i][:, None, :]
                if self.exclude is not None:
                    heads = torch.arange(hkv, device=q_pos.device).view(hkv, 1, 1) * group
                    keep = keep & ~self.exclude(torch.tensor(b), heads, q_pos[None], self.tokens[b, :, i][:, None, :])
                total += int(keep.expand(hkv, q1 - q0, keep.shape[-1]).sum()) * group
        return total


def slots_plan(slots: KeySlots, dtype: torch.dtype, budget_elems: int = GROUP_ELEMS, name: str = "slots") -> Plan:
    """The plan of ``slots``: per batch and group of query blocks, one call per query head
    of each KV head (heads g, g + group, ...), the keys gathered once per group."""
    block, nqb = slots.block, slots.num_blocks
    s = slots.tokens.shape[-1]
    off = slots.kv_len - slots.q_len

    def calls(geo: Geometry, scratch):
        device = slots.tokens.device
        hkv, group = geo.kv_heads, geo.group
        step = max(1, budget_elems // max(1, hkv * s * (2 * geo.head_size + block)))
        for b in range(geo.batch):
            bb = torch.full((), b, dtype=torch.long, device=device)
            for i in range(0, nqb, step):
                j = min(i + step, nqb)
                t = slots.tokens[b, :, i:j]  # (Hkv, n, S)
                keep = slots.valid[b, :, i:j].unsqueeze(2)  # (Hkv, n, 1, S)
                if slots.exclude is not None:
                    q_pos = ((torch.arange(i, j, device=device) * block)[:, None] + torch.arange(block, device=device)) + off
                    heads = torch.arange(hkv, device=device).view(hkv, 1, 1, 1) * group
                    keep = keep & ~slots.exclude(bb, heads, q_pos[None, :, :, None], t.unsqueeze(2))
                mask = None if bool(keep.all()) else additive(keep, dtype)
                keys = GatheredKeys(b, 0, 1, hkv, t, heads_first=True)  # shared by the group's query heads
                for g in range(group):
                    yield Call(RowSel(b, g, group, hkv, i * block, block, j - i, heads_first=True), keys, mask=mask)

    return Plan(name, calls, q_pad=nqb * block - slots.q_len)
