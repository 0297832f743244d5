"""BigBird block sparse attention: window blocks + global tokens + random blocks.

Paper: Zaheer et al., "Big Bird: Transformers for Longer Sequences", arXiv:2007.14062
(2020), the ITC variant (internal transformer construction: existing tokens are made
global). Keys and queries are grouped in blocks of ``block`` tokens (qb = i // block,
kb = j // block, positions absolute). Query i may see key j iff

    non-causal:  i < G  or  j < G  or  |qb - kb| <= (w - 1) / 2  or  R[qb, kb]
    causal:      j <= i  and  (j < G  or  0 <= qb - kb < w  or  R[qb, kb])

with G = ``global_tokens`` (global tokens attend to everything and are attended by
everything), w = ``window_blocks`` (odd; the query block and (w - 1) / 2 blocks on each
side; causal: the query block and the w - 1 previous ones) and R the random table:
each query block gets ``random_blocks`` distinct key blocks drawn uniformly among the
blocks it does not already see through the window or as fully-global blocks (causal:
only among earlier blocks, so the table never looks ahead), fewer when there are not
enough such blocks.

Determinism: row qb of R is drawn with a ``torch.Generator`` seeded from (seed, qb), so
a pattern is a function of (seed, sequence length, causal) only; the causal table is
even independent of the length (a query block's draws never depend on later blocks).
Deviations from the paper: the random blocks are the same for every head and batch row
(the reference implementation draws per head); the global tokens are the first G tokens
(the reference code makes the first and the last block global); non-causal attention
with Nq > Nk is refused (queries are positions of the key sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ... import validate
from ...kernels.pattern import cdiv, tile_ranges
from ...registry import register
from ..base import PatternMethod

_ROW_SEED_STRIDE = 1_000_003  # distinct generator seeds per (seed, query block)


@register(
    "block_local_global",
    family="static_sparse",
    paper="Big Bird: Transformers for Longer Sequences",
    arxiv="2007.14062",
    year=2020,
)
class BlockLocalGlobal(PatternMethod):
    """BigBird: sliding window of blocks, global tokens and random blocks per query block."""

    @dataclass
    class Config:
        block: int = 64
        window_blocks: int = 3
        global_tokens: int = 64
        random_blocks: int = 3
        seed: int = 0

    def check_config(self) -> None:
        c = self.config
        validate.check_positive(self.name, block=c.block, window_blocks=c.window_blocks)
        if c.window_blocks % 2 == 0:
            raise ValueError(
                f"window_blocks of method {self.name!r} must be odd (the query block plus (w - 1) / 2 "
                f"blocks on each side), got {c.window_blocks}"
            )
        validate.check_non_negative(self.name, global_tokens=c.global_tokens, random_blocks=c.random_blocks)
        if isinstance(c.seed, bool) or not isinstance(c.seed, int):
            raise ValueError(f"seed of method {self.name!r} must be an integer, got {c.seed!r}")

    def block_size(self) -> tuple[int, int]:
        return self.config.block, self.config.block

    # ------------------------------------------------------------------ random table

    def random_blocks_index(self, kv_len: int, causal: bool, device: torch.device | str = "cpu") -> torch.Tensor:
        """(nB, r) long: the random key blocks of each query block, -1 padded; nB = ceil(Nk / block).

        O(nB * r) memory (no nB x nB table), so long sequences stay cheap.
        """
        c = self.config
        nb = cdiv(kv_len, c.block)
        index = torch.full((nb, max(c.random_blocks, 1)), -1, dtype=torch.long)
        if c.random_blocks == 0:
            return index.to(device)
        half = (c.window_blocks - 1) // 2
        full_global = c.global_tokens // c.block  # blocks made only of global tokens
        blocks = torch.arange(nb)
        gen = torch.Generator()
        for qb in range(nb):
            if causal:
                cand = blocks[full_global : max(full_global, qb - c.window_blocks + 1)]
            else:
                cand = blocks[((blocks - qb).abs() > half) & (blocks >= full_global)]
            if cand.numel() == 0:
                continue
            gen.manual_seed((c.seed * _ROW_SEED_STRIDE + qb) % (2**63))
            picks = cand[torch.randperm(cand.numel(), generator=gen)[: c.random_blocks]]
            index[qb, : picks.numel()] = picks.sort().values
        return index.to(device)

    def random_table(self, kv_len: int, causal: bool, device: torch.device | str = "cpu") -> torch.Tensor:
        """(nB, nB) bool R[qb, kb] of ``random_blocks_index`` (for inspection and tests)."""
        index = self.random_blocks_index(kv_len, causal, device)
        table = torch.zeros(index.shape[0], index.shape[0] + 1, dtype=torch.bool, device=index.device)
        table.scatter_(1, torch.where(index >= 0, index, index.shape[0]), True)
        return table[:, :-1]

    # ------------------------------------------------------------------ element rule

    def mask_mod(self, causal: bool, kv_len: Optional[int] = None, device: torch.device | str = "cpu"):
        """The element rule; needs ``kv_len`` (the random table depends on the block count)."""
        if kv_len is None:
            raise ValueError(f"method {self.name!r} needs kv_len to build its random table")
        c = self.config
        index = self.random_blocks_index(kv_len, causal, device)
        last = index.shape[0] - 1
        g, w, half, blk = c.global_tokens, c.window_blocks, (c.window_blocks - 1) // 2, c.block

        def bigbird(b, h, q_pos, k_pos):
            qb, kb = q_pos // blk, k_pos // blk
            # Clamped lookup: padded query rows past the end read a valid (ignored) row.
            row = qb.clamp(0, last)
            rand = index[row, 0] == kb
            for m in range(1, index.shape[1]):
                rand = rand | (index[row, m] == kb)
            dist = qb - kb
            if causal:
                return (k_pos <= q_pos) & ((k_pos < g) | (dist < w) | rand)
            return (q_pos < g) | (k_pos < g) | (dist.abs() <= half) | rand

        return bigbird

    # ------------------------------------------------------------------ block mask

    def _check_lengths(self, q_len: int, kv_len: int) -> None:
        if q_len > kv_len:
            raise ValueError(
                f"method {self.name!r} needs Nq <= Nk (queries are the last Nq positions of the key "
                f"sequence), got Nq={q_len}, Nk={kv_len}"
            )

    def full_block_mask(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> Optional[torch.Tensor]:
        """(nQB, nKB) tiles whose every pair is allowed, when query tiles are BigBird blocks
        (Nk - Nq a multiple of ``block``; else None): below the diagonal (causal) and local,
        random or wholly global; a speed hint for the kernels."""
        c = self.config
        blk, w, half = c.block, c.window_blocks, (c.window_blocks - 1) // 2
        if (kv_len - q_len) % blk:
            return None
        q_lo, q_hi, k_lo, k_hi = tile_ranges(q_len, kv_len, blk, blk, device)
        qb, kb = q_lo // blk, k_lo // blk
        rand = self.random_table(kv_len, causal, device)[qb[:, 0]]
        if causal:
            return (k_hi <= q_lo) & ((kb >= qb - w + 1) | rand | (k_hi < c.global_tokens))
        return ((kb - qb).abs() <= half) | rand | (k_hi < c.global_tokens) | (q_hi < c.global_tokens)

    def block_mask(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> torch.Tensor:
        """Exact (nQB, nKB) tiles: a query tile spans at most two absolute blocks."""
        self._check_lengths(q_len, kv_len)
        c = self.config
        blk, w, half = c.block, c.window_blocks, (c.window_blocks - 1) // 2
        q_lo, q_hi, k_lo, k_hi = tile_ranges(q_len, kv_len, blk, blk, device)
        qb_lo, qb_hi, kb = q_lo // blk, q_hi // blk, k_lo // blk
        table = self.random_table(kv_len, causal, device)  # (nB, nB): the tile grid itself
        rand = table[qb_lo[:, 0]] | table[qb_hi[:, 0]]
        if causal:
            local = (kb >= qb_lo - w + 1) & (kb <= qb_hi)
            return (k_lo <= q_hi) & (local | rand | (k_lo < c.global_tokens))
        local = (kb >= qb_lo - half) & (kb <= qb_hi + half)
        return local | rand | (k_lo < c.global_tokens) | (q_lo < c.global_tokens)


