"""MInference's three head patterns: their estimators and the plan entry that names one.

Paper: Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
Dynamic Sparse Attention", arXiv:2407.02490 (2024).

- A-shape (``a_shape_index``): the first ``sink`` columns and the ``window`` nearest
  diagonals, no estimate (StreamingLLM's pattern).
- vertical-slash (``estimate_vertical_slash``): per head, the last ``last_q`` queries
  estimate attention to all keys (last_q x Nk, softmax, causal). Column sums pick the
  top ``vertical_size`` columns (the first ``sink`` columns always kept); sums along
  diagonals d = q - k pick the top ``slash_size`` diagonals (the ``local`` nearest
  diagonals always kept). As in MInference's kernel, a selected diagonal makes each
  64-row query block attend to the whole key run the diagonal crosses (see
  ``attnkit.kernels.vertical_slash``).
- block-sparse (``block_sparse_mask``): q and k mean-pooled over 64-token blocks, pooled
  scores (causal), top ``top_k`` key blocks per query block. Deviation: the diagonal
  block and the first block are always kept, so every row has a key and the sink is
  never lost.

A plan entry is a dict ``{"pattern": kind, fields...}`` (``check_head_pattern``);
``estimate_heads`` turns one entry per query head into a ``kernels.mixed.MixedIndex``.
The methods are ``vertical_slash``, ``minference_block`` and ``minference``; the plan
file and its offline search are in ``minference_plan``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ... import validate
from ...kernels.mixed import MixedIndex
from ...kernels.vertical_slash import VerticalSlashIndex
from .common import (
    block_pattern,
    causal_block_mask,
    diagonal_block_mask,
    diagonal_sums,
    gqa_scores,
    last_query_probs,
    pool,
    topk_mask,
)

PAPER = "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention"
ARXIV = "2407.02490"
BLOCK = 64  # MInference's block size (query rows per slash run, pooled block of block-sparse)


def _per_head(value: int | Sequence[int], heads: int) -> list[int]:
    return [int(value)] * heads if isinstance(value, int) else [int(x) for x in value]


def estimate_vertical_slash(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    vertical_size: int | Sequence[int],
    slash_size: int | Sequence[int],
    last_q: int = 64,
    sink: int = 30,
    local: int = 100,
    block: int = BLOCK,
) -> VerticalSlashIndex:
    """Columns and diagonals per (batch, query head). q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D).

    ``vertical_size`` / ``slash_size``: an int or one per query head; they count the
    forced ``sink`` columns / ``local`` diagonals and are raised to them, clipped to Nk.
    A head with vertical_size=sink and slash_size=local is the A-shape (StreamingLLM).
    """
    b, hq, nq = q.shape[:3]
    nk = k.shape[2]
    probs = last_query_probs(q, k, last_q, scale, causal=True)  # (B, Hq, L, Nk)
    vertical = probs.sum(dim=-2)
    slash = diagonal_sums(probs, nk)
    del probs
    vertical[..., : min(sink, nk)] = float("inf")
    slash[..., : min(local, nk)] = float("inf")
    vs, ss = _per_head(vertical_size, hq), _per_head(slash_size, hq)
    verticals: list[list[torch.Tensor]] = [[None] * hq for _ in range(b)]  # type: ignore[list-item]
    slashes: list[list[torch.Tensor]] = [[None] * hq for _ in range(b)]  # type: ignore[list-item]
    for h in range(hq):
        nv = min(max(vs[h], sink), nk)
        ns = min(max(ss[h], local, 1), nk)
        v_idx = vertical[:, h].topk(nv, dim=-1).indices.sort(dim=-1).values if nv else None
        s_idx = slash[:, h].topk(ns, dim=-1).indices.sort(dim=-1).values
        for bb in range(b):
            verticals[bb][h] = v_idx[bb] if v_idx is not None else torch.zeros(0, dtype=torch.long, device=q.device)
            slashes[bb][h] = s_idx[bb]
    return VerticalSlashIndex(verticals, slashes, block, nq, nk)


def a_shape_index(batch: int, heads: int, q_len: int, kv_len: int, sink: int, window: int, device, block: int = BLOCK) -> VerticalSlashIndex:
    """The A-shape (sink columns + local diagonals) as a vertical-slash index, no estimate."""
    cols = torch.arange(min(sink, kv_len), device=device)
    diags = torch.arange(min(max(window, 1), kv_len), device=device)
    return VerticalSlashIndex([[cols] * heads for _ in range(batch)], [[diags] * heads for _ in range(batch)], block, q_len, kv_len)


def block_sparse_mask(q: torch.Tensor, k: torch.Tensor, scale: float, top_k: int | Sequence[int], causal: bool, block: int = BLOCK) -> torch.Tensor:
    """(B, Hq, nQB, nKB) bool: top_k key blocks per query block by mean-pooled q . k.

    The diagonal block(s) and the first key block are always kept (they do not count
    against top_k).
    """
    nq, nk = q.shape[2], k.shape[2]
    hq = q.shape[1]
    scores = gqa_scores(pool(q, block), pool(k, block), scale)  # (B, Hq, nQB, nKB)
    allowed = causal_block_mask(nq, nk, block, block, q.device) if causal else torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    forced = diagonal_block_mask(nq, nk, block, block, q.device).clone()
    forced[:, 0] = True
    forced &= allowed
    ks = _per_head(top_k, hq)
    rest = allowed & ~forced
    out = torch.zeros_like(scores, dtype=torch.bool)
    for kk in sorted(set(ks)):
        heads = [h for h in range(hq) if ks[h] == kk]
        out[:, heads] = topk_mask(scores[:, heads], kk, rest.expand(len(heads), *rest.shape))
    return out | forced


# --- per-head plans --------------------------------------------------------------------

PATTERNS = ("a_shape", "vertical_slash", "block_sparse")
_FIELDS = {"a_shape": ("sink", "window"), "vertical_slash": ("vertical_size", "slash_size"), "block_sparse": ("top_k",)}


def check_head_pattern(entry: Any, where: str = "head pattern") -> dict:
    """Validate one plan entry {"pattern": ..., fields...}; returns it."""
    if not isinstance(entry, dict) or "pattern" not in entry:
        raise ValueError(f"{where} must be a dict with a 'pattern' key ({', '.join(PATTERNS)}), got {entry!r}")
    kind = entry["pattern"]
    if kind not in PATTERNS:
        validate.unknown_name("pattern", kind, list(PATTERNS))
    fields = _FIELDS[kind]
    extra = [key for key in entry if key not in fields and key != "pattern" and key != "recall" and key != "density"]
    missing = [key for key in fields if key not in entry]
    if extra or missing:
        raise ValueError(f"{where}: pattern {kind!r} takes fields {fields}; missing {missing}, unknown {extra}")
    for key in fields:
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key in ("sink", "vertical_size") else 1):
            raise ValueError(f"{where}: field {key!r} must be an integer >= {0 if key in ('sink', 'vertical_size') else 1}, got {value!r}")
    return entry


def estimate_heads(q: torch.Tensor, k: torch.Tensor, scale: float, head_patterns: list[dict], last_q: int = 64) -> MixedIndex:
    """Each query head's pattern from its plan entry. q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D)."""
    b, hq, nq = q.shape[:3]
    hkv, nk = k.shape[1], k.shape[2]
    if len(head_patterns) != hq:
        raise ValueError(f"head_patterns has {len(head_patterns)} entries but q has Hq={hq} heads; give one per query head")
    group = hq // hkv
    kinds = [check_head_pattern(e, f"head_patterns[{h}]")["pattern"] for h, e in enumerate(head_patterns)]
    vs_heads = [h for h in range(hq) if kinds[h] != "block_sparse"]
    bs_heads = [h for h in range(hq) if kinds[h] == "block_sparse"]
    vs = bs = None
    if vs_heads:
        est = [h for h in vs_heads if kinds[h] == "vertical_slash"]
        verticals = [[None] * len(vs_heads) for _ in range(b)]
        slashes = [[None] * len(vs_heads) for _ in range(b)]
        if est:  # each head against its own KV head
            kv_for = torch.tensor([h // group for h in est], device=q.device)
            sizes_v = [head_patterns[h]["vertical_size"] for h in est]
            sizes_s = [head_patterns[h]["slash_size"] for h in est]
            # The forced sink columns / local diagonals never exceed a head's own sizes.
            sub = estimate_vertical_slash(
                q[:, est], k[:, kv_for], scale, sizes_v, sizes_s, last_q, sink=min(30, min(sizes_v)), local=min(100, min(sizes_s))
            )
        for j, h in enumerate(vs_heads):
            if kinds[h] == "a_shape":
                e = head_patterns[h]
                a = a_shape_index(b, 1, nq, nk, e["sink"], e["window"], q.device)
                for bb in range(b):
                    verticals[bb][j], slashes[bb][j] = a.verticals[bb][0], a.slashes[bb][0]
            else:
                i = est.index(h)
                for bb in range(b):
                    verticals[bb][j], slashes[bb][j] = sub.verticals[bb][i], sub.slashes[bb][i]
        vs = VerticalSlashIndex(verticals, slashes, BLOCK, nq, nk)
    if bs_heads:
        kv_for = torch.tensor([h // group for h in bs_heads], device=q.device)
        mask = block_sparse_mask(q[:, bs_heads], k[:, kv_for], scale, [head_patterns[h]["top_k"] for h in bs_heads], True)
        bs = block_pattern(mask, BLOCK, BLOCK, nq, nk, True)
    return MixedIndex(vs, vs_heads, bs, bs_heads, hq)
