"""Mixed patterns: some query heads on a vertical-slash index, the others on a block pattern.

``MixedIndex`` is the pattern of methods that pick a pattern kind per head (MInference's
per-head plans, FlexPrefill's query-aware / vertical-slash heads). Each group of heads
runs through the kernel layer (``run``) on its own kernel, and the outputs are put back
in head order; ``mixed_block_pattern`` gives the one equivalent per-head BlockPattern
(for stats and the block backends).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import run
from .block_sparse import count_allowed_pairs
from .pattern import BlockPattern
from .vertical_slash import VerticalSlashIndex, count_pairs, to_block_pattern


@dataclass
class MixedIndex:
    """Per-head patterns: vertical-slash heads and block-sparse heads."""

    vs: VerticalSlashIndex | None  # sub-index over vs_heads (A-shape included)
    vs_heads: list[int]
    bs: BlockPattern | None  # pattern over bs_heads
    bs_heads: list[int]
    heads: int


def mixed_attention(q, k, v, index: MixedIndex, scale: float, backend: str, method: str):
    """Attention over a MixedIndex: the vertical-slash heads and the block-sparse heads each
    through the kernel layer. q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D|Dv).
    Returns (out (B, Hq, Nq, Dv), lse (B, Hq, Nq), backends used joined by "+")."""
    group = q.shape[1] // k.shape[1]
    outs, lses, order, used = [], [], [], []
    for heads, sub in ((index.vs_heads, index.vs), (index.bs_heads, index.bs)):
        if not heads:
            continue
        kv_for = torch.tensor([h // group for h in heads], device=q.device)
        out, lse, name = run(sub, q[:, heads], k[:, kv_for], v[:, kv_for], scale, backend, return_lse=True, method=method)
        outs.append(out)
        lses.append(lse)
        order.extend(heads)
        used.append(name)
    back = torch.empty(len(order), dtype=torch.long, device=q.device)
    back[torch.tensor(order, device=q.device)] = torch.arange(len(order), device=q.device)
    out = torch.cat(outs, dim=1).index_select(1, back)
    lse = torch.cat(lses, dim=1).index_select(1, back)
    return out, lse, "+".join(used)


def mixed_count_pairs(index: MixedIndex, batch: int) -> int:
    """Allowed pairs over all batches and heads of a MixedIndex."""
    total = count_pairs(index.vs) if index.vs is not None else 0
    if index.bs is not None:
        total += count_allowed_pairs(index.bs, batch, len(index.bs_heads))
    return total


def mixed_block_pattern(index: MixedIndex) -> BlockPattern:
    """One per-head BlockPattern equal to the union of the vertical-slash and block-sparse heads."""
    parts = []
    if index.vs is not None:
        parts.append((index.vs_heads, to_block_pattern(index.vs, index.vs.block)))
    if index.bs is not None:
        parts.append((index.bs_heads, index.bs))
    ref = parts[0][1]
    bsz = max(p.kv_blocks.shape[0] for _, p in parts)
    width = max(p.kv_blocks.shape[-1] for _, p in parts)
    device = ref.kv_blocks.device
    lists = torch.full((bsz, index.heads, ref.num_q_blocks, width), -1, dtype=torch.long, device=device)
    owner = torch.zeros(index.heads, dtype=torch.long, device=device)  # part number of each head
    local = torch.zeros(index.heads, dtype=torch.long, device=device)  # head number inside its part
    for n, (heads, p) in enumerate(parts):
        kb = p.kv_blocks.expand(bsz, len(heads), *p.kv_blocks.shape[2:])
        lists[:, heads, :, : kb.shape[-1]] = kb
        owner[heads] = n
        local[heads] = torch.arange(len(heads), device=device)
    mods = [p.mask_mod for _, p in parts]

    def rule(b, h, q_pos, k_pos):
        out = None
        for n, mod in enumerate(mods):
            hit = mod(b, local[h], q_pos, k_pos) & (owner[h] == n)
            out = hit if out is None else out | hit
        return out

    return BlockPattern(kv_blocks=lists, block_q=ref.block_q, block_k=ref.block_k, q_len=ref.q_len, kv_len=ref.kv_len, mask_mod=rule)
