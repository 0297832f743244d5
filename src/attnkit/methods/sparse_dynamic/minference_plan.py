"""MInference plans: one pattern per head and layer, saved as JSON, and the offline search.

Paper: Jiang et al., "MInference 1.0", arXiv:2407.02490 (2024).

A plan file is ``{"method": "minference", "version": 1, ..., "layers": [[entry, ...], ...]}``
with one entry per query head (``minference_patterns.check_head_pattern``); the
``minference`` method runs one layer of it.

``search_head_patterns`` is the offline search. On calibration q/k, for each head, each
candidate pattern ({A-shape, vertical-slash, block-sparse}, each at the largest setting
whose density fits ``budget``) is scored by the attention mass it recalls; the best
wins (ties within ``tie`` go to the cheaper estimator: A-shape, then vertical-slash).
Deviation: the paper scores candidates by the recall of the attention output on one
calibration sample with equal FLOPs; here "FLOPs" is the measured density on the
calibration shape.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from ...kernels.mixed import mixed_block_pattern, mixed_count_pairs
from ..base import full_pairs
from .common import gqa_scores
from .minference_patterns import BLOCK, PATTERNS, check_head_pattern, estimate_heads


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
