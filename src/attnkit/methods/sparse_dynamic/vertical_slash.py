"""MInference: vertical-slash and block-sparse dynamic patterns, and the per-head pattern search.

Paper: Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
Dynamic Sparse Attention", arXiv:2407.02490 (2024).

- ``vertical_slash``: per head, the last ``last_q`` queries estimate attention to all
  keys (last_q x Nk, softmax, causal). Column sums pick the top ``vertical_size``
  columns (the first ``sink`` columns always kept); sums along diagonals d = q - k pick
  the top ``slash_size`` diagonals (the ``local`` nearest diagonals always kept). As in
  MInference's kernel, a selected diagonal makes each 64-row query block attend to the
  whole key run the diagonal crosses (see ``attnkit.kernels.vertical_slash``).
- ``minference_block``: MInference's block-sparse pattern: q and k mean-pooled over
  64-token blocks, pooled scores (causal), top ``top_k`` key blocks per query block.
  Deviation: the diagonal block and the first block are always kept, so every row has a
  key and the sink is never lost.
- ``search_head_patterns``: the offline search. On calibration q/k, for each head, each
  candidate pattern ({A-shape, vertical-slash, block-sparse}, each at the largest setting
  whose density fits ``budget``) is scored by the attention mass it recalls; the best
  wins (ties within ``tie`` go to the cheaper estimator: A-shape, then vertical-slash).
  Deviation: the paper scores candidates by the recall of the attention output on one
  calibration sample with equal FLOPs; here "FLOPs" is the measured density on the
  calibration shape.
- ``minference``: runs a saved plan (``plan=PATH``, ``layer=i``) or an explicit
  ``head_patterns`` list, one pattern per query head.

Defaults of ``vertical_slash``, chosen for 4k-64k contexts: last_q=64, vertical_size=1000
(MInference's value; includes sink=30 forced first columns), slash_size=128 (includes
local=100 forced nearest diagonals, so 28 chosen diagonals; MInference's 6096 targets
128k+ and, with 64-key runs per diagonal, would be nearly dense at 32k).
``minference_block``: top_k=64 blocks of 64 keys (4096 keys per query block).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ... import validate
from ...kernels import BlockPattern, count_allowed_pairs, run
from ...kernels.vertical_slash import VerticalSlashIndex, count_pairs, to_block_pattern
from ...registry import register
from ..base import full_pairs
from .common import (
    DynamicMethod,
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


# --- estimators ----------------------------------------------------------------------


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


# --- methods ---------------------------------------------------------------------------


class _VerticalSlashKernel(DynamicMethod):
    """Shared count / stats of methods whose estimate is a VerticalSlashIndex (the kernel
    layer runs it on its own kernel, or on any block backend through ``to_block_pattern``)."""

    def count_pairs(self, pattern, batch, heads):
        return count_pairs(pattern)

    def to_block_pattern(self, pattern):
        return to_block_pattern(pattern)


@register("vertical_slash", family="dynamic_sparse", paper=PAPER, arxiv=ARXIV, year=2024, supports=("causal", "gqa"))
class VerticalSlash(_VerticalSlashKernel):
    """MInference vertical-slash: top columns + top diagonals from the last queries' attention."""

    @dataclass
    class Config:
        vertical_size: int = 1000
        slash_size: int = 128
        last_q: int = 64
        sink: int = 30
        local: int = 100

    def check_config(self) -> None:
        c = self.config
        validate.check_positive(self.name, slash_size=c.slash_size, last_q=c.last_q, local=c.local)
        if isinstance(c.vertical_size, bool) or c.vertical_size < 0 or c.sink < 0:
            raise ValueError(f"vertical_size and sink of method {self.name!r} must be integers >= 0, got {c.vertical_size!r}, {c.sink!r}")

    def estimate(self, q, k, causal, scale):
        c = self.config
        return estimate_vertical_slash(q, k, scale, c.vertical_size, c.slash_size, c.last_q, c.sink, c.local)


@register("minference_block", family="dynamic_sparse", paper=PAPER, arxiv=ARXIV, year=2024)
class MInferenceBlock(DynamicMethod):
    """MInference block-sparse: top-k 64x64 blocks per query block from mean-pooled q, k."""

    @dataclass
    class Config:
        top_k: int = 64

    def check_config(self) -> None:
        validate.check_positive(self.name, top_k=self.config.top_k)

    def estimate(self, q, k, causal, scale):
        mask = block_sparse_mask(q, k, scale, self.config.top_k, causal)
        return block_pattern(mask, BLOCK, BLOCK, q.shape[2], k.shape[2], causal)


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


def save_plan(path: str, layers: list[list[dict]], **meta: Any) -> None:
    """Write a per-layer, per-head plan: {"method": "minference", "layers": [[{...}, ...], ...]}."""
    for i, heads in enumerate(layers):
        for h, entry in enumerate(heads):
            check_head_pattern(entry, f"layer {i} head {h}")
    with open(path, "w") as f:
        json.dump({"method": "minference", "version": 1, **meta, "layers": layers}, f, indent=1)


def load_plan(path: str) -> list[list[dict]]:
    """Read a plan written by ``save_plan``; returns its layers (one list of head entries each)."""
    if not os.path.exists(path):
        raise ValueError(f"plan file {path!r} does not exist; write one with search_head_patterns + save_plan")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise ValueError(f"plan file {path!r} has no 'layers' list")  # noqa: TRY004 (bad file content)
    for i, heads in enumerate(data["layers"]):
        for h, entry in enumerate(heads):
            check_head_pattern(entry, f"plan {path!r} layer {i} head {h}")
    return data["layers"]


@dataclass
class MixedIndex:
    """Per-head patterns of ``minference``: vertical-slash heads and block-sparse heads."""

    vs: VerticalSlashIndex | None  # sub-index over vs_heads (A-shape included)
    vs_heads: list[int]
    bs: BlockPattern | None  # pattern over bs_heads
    bs_heads: list[int]
    heads: int


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


class MixedPatternMethod(DynamicMethod):
    """A dynamic method whose estimate is a ``MixedIndex`` (vertical-slash heads plus
    block-sparse heads): each group of heads runs on its own kernel."""

    def attend(self, q, k, v, pattern, scale, backend, want_lse):
        return mixed_attention(q, k, v, pattern, scale, backend, self.name)

    def patterns(self, q, k, causal, scale):
        with torch.no_grad():
            index = self.estimate(q, k, causal, scale)
        return [p for p in (index.vs, index.bs) if p is not None]

    def count_pairs(self, pattern, batch, heads):
        return mixed_count_pairs(pattern, batch)

    def to_block_pattern(self, pattern):
        return mixed_block_pattern(pattern)


@register("minference", family="dynamic_sparse", paper=PAPER, arxiv=ARXIV, year=2024, supports=("causal", "gqa"))
class MInference(MixedPatternMethod):
    """MInference with per-head patterns (A-shape / vertical-slash / block-sparse) from a plan."""

    @dataclass
    class Config:
        plan: str | None = None
        layer: int = 0
        head_patterns: list | None = None
        last_q: int = 64

    def check_config(self) -> None:
        c = self.config
        if (c.plan is None) == (c.head_patterns is None):
            raise ValueError(f"method {self.name!r} needs exactly one of plan=PATH (with layer=i) or head_patterns=[...]")
        validate.check_positive(self.name, last_q=c.last_q)
        if c.plan is not None:
            layers = load_plan(c.plan)
            if not (0 <= c.layer < len(layers)):
                raise ValueError(f"layer={c.layer} of method {self.name!r} is out of range: plan {c.plan!r} has {len(layers)} layers")
            self.head_patterns = layers[c.layer]
        else:
            for h, e in enumerate(c.head_patterns):
                check_head_pattern(e, f"head_patterns[{h}]")
            self.head_patterns = list(c.head_patterns)

    def estimate(self, q, k, causal, scale):
        return estimate_heads(q, k, scale, self.head_patterns, self.config.last_q)



def mixed_attention(q, k, v, index: MixedIndex, scale: float, backend: str, method: str):
    """Attention over a MixedIndex: the vertical-slash heads and the block-sparse heads each
    through the kernel layer. Returns (out (B, Hq, Nq, Dv), lse (B, Hq, Nq), backends used)."""
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


# --- offline search -----------------------------------------------------------------------


def _recall(q, k, scale, mask, heads, chunk=256) -> torch.Tensor:
    """(Hq,) mean attention mass inside ``mask`` (Hq, Nq, Nk) per head (batch 0), from
    exact causal probabilities computed in row chunks."""
    nq, nk = q.shape[2], k.shape[2]
    off = nk - nq
    total = torch.zeros(heads, dtype=torch.float64)
    for r0 in range(0, nq, chunk):
        r1 = min(nq, r0 + chunk)
        s = gqa_scores(q[:1, :, r0:r1], k[:1], scale)[0]  # (Hq, rows, Nk)
        rows = torch.arange(r0, r1)[:, None] + off
        s = s.masked_fill(torch.arange(nk)[None, :] > rows, float("-inf"))
        p = torch.softmax(s.double(), dim=-1)
        total += (p * mask[:, r0:r1]).sum(dim=(1, 2))
    return total / nq


def _candidates(budget_keys: int) -> dict[str, list[dict]]:
    """Settings of each pattern costing about ``budget_keys`` keys per query row.

    A slash run spans a 64-row block, so a band of W local diagonals costs about
    W + 32 keys per row; sizes shrink with the budget so any budget can be met.
    """
    keys = max(2, budget_keys)
    sink = max(1, min(64, keys // 8))
    out = {
        "a_shape": [{"pattern": "a_shape", "sink": sink, "window": max(1, keys - sink - BLOCK // 2)}],
        "vertical_slash": [],
        "block_sparse": [{"pattern": "block_sparse", "top_k": max(1, keys // BLOCK - 2)}],
    }
    for frac in (0.25, 0.5, 0.75):  # share of the budget spent on columns
        vertical = max(1, int(keys * frac))
        slash = max(1, keys - vertical - BLOCK // 2)
        out["vertical_slash"].append({"pattern": "vertical_slash", "vertical_size": vertical, "slash_size": slash})
    return out


def search_head_patterns(
    q: torch.Tensor,
    k: torch.Tensor,
    budget: float = 0.1,
    scale: float | None = None,
    tie: float = 1e-3,
    last_q: int = 64,
) -> list[dict]:
    """Assign each query head the best of {A-shape, vertical-slash, block-sparse} under a budget.

    q: (1, Hq, N, D), k: (1, Hkv, N, D) calibration projections of one layer (causal).
    budget: the density (fraction of causal pairs) every candidate may use at most, as
    measured on this shape. Returns one entry per query head, e.g.
    {"pattern": "vertical_slash", "vertical_size": 500, "slash_size": 100,
    "recall": 0.93, "density": 0.09}; pass a list of these (one per layer) to ``save_plan``.
    Builds (Hq, chunk, N) score tiles: calibration-sized N only (a few thousand).
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a density in (0, 1], got {budget!r}")
    hq, nq = q.shape[1], q.shape[2]
    nk = k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    full = full_pairs(nq, nk, True)
    best: list[dict | None] = [None] * hq
    order = {name: n for n, name in enumerate(PATTERNS)}
    budget_keys = max(1, int(budget * full / nq))
    for shrink in (1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05):  # largest setting that fits the budget
        cands = _candidates(int(budget_keys * shrink))
        for kind, settings in cands.items():
            for entry in settings:
                index = estimate_heads(q[:1], k[:1], scale, [entry] * hq, last_q)
                pattern = mixed_block_pattern(index)
                density = mixed_count_pairs(index, 1) / (full * hq)
                if density > budget:
                    continue
                # per-head density and recall
                mask_rows = pattern.dense_mask(1, hq)[0]  # (Hq, N, N) bool: calibration sizes only
                recall = _recall(q, k, scale, mask_rows, hq)
                per_head_density = mask_rows.sum(dim=(1, 2)).double() / full
                for h in range(hq):
                    if per_head_density[h] > budget:
                        continue
                    cand = dict(entry, recall=float(recall[h]), density=float(per_head_density[h]))
                    cur = best[h]
                    if cur is None or cand["recall"] > cur["recall"] + tie or (
                        abs(cand["recall"] - cur["recall"]) <= tie and order[kind] < order[cur["pattern"]]
                    ):
                        best[h] = cand
        if all(b is not None for b in best):
            break
    for h in range(hq):
        if best[h] is None:
            best[h] = {"pattern": "a_shape", "sink": 4, "window": max(1, budget_keys // 2), "recall": float("nan"), "density": float("nan")}
    return best  # type: ignore[return-value]
