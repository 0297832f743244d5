"""Per-head attention scores of one layer from sampled query rows, without an Nq x Nk tensor.

All scores are means over the sampled query rows (and over the batch; no padding),
computed from exact causal softmax probabilities in float64, ``chunk`` rows at a time, so
memory is O(Hq x chunk x N). Definitions (docs/analysis.md):

- ``sink``: attention mass on the first ``sink_tokens`` keys (StreamingLLM, arXiv 2309.17453);
- ``entropy``: row entropy -sum p log p (nats); ``entropy_norm``: the same divided by
  log(row length), 0 = one key, 1 = uniform (rows of length 1 are left out);
- ``streaming``: mass inside the first ``sink_tokens`` keys plus the last ``window`` keys
  (the StreamingLLM / DuoAttention streaming-head pattern);
- hidden sinks (ACT, arXiv 2406.15765): a key at position j >= ``sink_tokens`` whose
  attention score, relative to uniform attention (score x row length), averaged over the
  sampled rows that see it from outside their local ``window`` (rows i >= j + window; at
  least an eighth of the sampled rows), exceeds ``alpha``: ACT's a > alpha / N, with the
  local diagonal left out so recent tokens do not pass for sinks; each is reported with
  its mean score over those rows (``hidden_sink_mass``: their share of all the mass);
- pattern recall (MInference, arXiv 2407.02490): the mass each of A-shape,
  vertical-slash and block-sparse recovers with the same number of keys per row
  (``budget`` x N); the class is the best (ties within ``tie`` go to the cheaper
  estimator: A-shape, then vertical-slash, as MInference's offline search).
"""

from __future__ import annotations

import math
from typing import Any

import torch

PATTERNS = ("a_shape", "vertical_slash", "block_sparse")
BLOCK = 64
TILE = 1 << 18  # elements of one float64 score tile


def sample_rows(n: int, sample_rows: int) -> torch.Tensor:
    """Query rows to score: all ``n`` rows when ``sample_rows >= n``, else the last
    ``sample_rows // 4`` rows plus a uniform (evenly spaced, deterministic) sample of the rest."""
    if sample_rows >= n:
        return torch.arange(n)
    last = max(1, sample_rows // 4)
    rest = sample_rows - last
    spread = torch.linspace(0, n - last - 1, rest).round().long() if rest > 0 else torch.empty(0, dtype=torch.long)
    return torch.unique(torch.cat([spread, torch.arange(n - last, n)]))


def _probs(q64: torch.Tensor, k64: torch.Tensor, rows: torch.Tensor, scale: float,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hq, len(rows), Nk) float64 causal softmax of the given query rows (bottom-right
    aligned), also restricted to ``mask`` (bool, broadcastable to (B, Hq, Nq, Nk)) if given."""
    nq, nk = q64.shape[2], k64.shape[2]
    group = q64.shape[1] // k64.shape[1]
    qr = q64[:, :, rows].unflatten(1, (k64.shape[1], group))  # (B, Hkv, G, R, D)
    s = torch.einsum("bhgrd,bhkd->bhgrk", qr, k64).flatten(1, 2) * scale
    visible = torch.arange(nk)[None, :] <= rows[:, None] + (nk - nq)
    if mask is not None:
        visible = visible & mask[..., rows, :]
    return torch.softmax(s.masked_fill(~visible, -math.inf), dim=-1)


def _budget_keys(budget: float, n: int) -> int:
    """Keys per row of every pattern: ``budget`` x n rounded to whole 64-key blocks (>= 1 block)."""
    return BLOCK * max(1, round(budget * n / BLOCK))


def head_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, *, sample_rows_: int = 256,
                sink_tokens: int = 4, window: int = 64, alpha: float = 5.0, budget: float = 0.1,
                tie: float = 1e-3, max_hidden: int = 8, chunk: int = 64,
                mask: torch.Tensor | None = None, map_bins: int = 0) -> dict[str, Any]:
    """Scores of every query head of one layer.

    q: (B, Hq, N, D); k: (B, Hkv, N_kv, D) with RoPE applied (causal, queries are the last
    N positions). mask: None, or bool (True = may attend) broadcastable to (B, Hq, N, N_kv),
    e.g. a sliding-window layer's mask (the scores' windows stay as defined). ``map_bins`` > 0
    also returns ``map`` (Hq, bins, bins): a coarse attention map, the mass of each key bin
    averaged over the sampled rows of each row bin (NaN where a row bin has no sampled row). Returns a dict of (Hq,) float64 tensors ``sink``, ``entropy``,
    ``entropy_norm``, ``streaming``, ``hidden_sink_mass``; ``pattern_recall`` (Hq, 3)
    in ``PATTERNS`` order; ``pattern`` (Hq,) long; ``hidden_sinks``: per head a list of
    [position, mean mass] (at most ``max_hidden``, largest mass first); ``rows``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    off = nk - nq
    q64, k64 = q.double(), k.double()
    rows = sample_rows(nq, sample_rows_)
    chunk = max(1, min(chunk, TILE // max(1, b * hq * nk)))  # a few MiB per (rows x keys) tile
    nr = len(rows)
    keys = _budget_keys(budget, nk)
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    sink, ent, ent_norm, stream = z(hq), z(hq), z(hq), z(hq)
    norm_rows = 0
    col_mass, col_ratio, col_rows = z(hq, nk), z(hq, nk), z(nk)
    diag_mass = z(hq, nk)  # by offset i - j
    a_shape, block = z(hq), z(hq)
    a_sink = max(1, min(BLOCK, keys // 8))
    kpos = torch.arange(nk)
    nblocks = (nk + BLOCK - 1) // BLOCK
    if map_bins:
        amap, map_rows = z(hq, map_bins, map_bins), z(map_bins)
        kbin = kpos * map_bins // nk
    for r0 in range(0, nr, chunk):
        r = rows[r0:r0 + chunk]
        pos = r + off  # key-space positions of the rows
        pb = _probs(q64, k64, r, scale, mask)  # (B, Hq, R, Nk)
        p = pb.mean(0)  # linear scores: the batch mean; entropy: the mean of per-element entropies
        length = (pos + 1).double()  # visible keys per row
        first = kpos[None, :] < sink_tokens
        local = kpos[None, :] > pos[:, None] - window
        sink += (p * first).sum((1, 2))
        stream += (p * (first | local)).sum((1, 2))
        e = -(pb * torch.log(pb.clamp_min(1e-300))).sum(-1).mean(0)  # (Hq, R)
        ent += e.sum(-1)
        many = length > 1
        ent_norm += (e[:, many] / torch.log(length[many])).sum(-1)
        norm_rows += int(many.sum())
        seen = kpos[None, :] <= pos[:, None]  # (R, Nk)
        far = kpos[None, :] <= pos[:, None] - window  # ACT's columns: rows outside the local window
        col_mass += (p * far).sum(1)
        col_ratio += (p * far * length[None, :, None]).sum(1)
        col_rows += far.sum(0)
        # diagonal (offset) masses for vertical-slash
        offset = (pos[:, None] - kpos[None, :]).clamp_min(0).expand(hq, -1, -1)
        diag_mass.scatter_add_(1, offset.flatten(1), (p * seen).flatten(1))
        # A-shape: first a_sink keys + the last keys - a_sink (whole row when it is short)
        a_mask = (kpos[None, :] < a_sink) | (kpos[None, :] > pos[:, None] - (keys - a_sink))
        a_shape += (p * a_mask).sum((1, 2))
        # block-sparse: the best keys // BLOCK key blocks of each row (oracle selection)
        pad = nblocks * BLOCK - nk
        blocks = torch.nn.functional.pad(p, (0, pad)).unflatten(-1, (nblocks, BLOCK)).sum(-1)
        top = min(nblocks, max(1, keys // BLOCK))
        block += blocks.topk(top, dim=-1).values.sum((1, 2))
        if map_bins:
            rbin = pos * map_bins // nk
            binned = z(hq, len(r), map_bins).index_add_(2, kbin, p)
            amap.index_add_(1, rbin, binned)
            map_rows.index_add_(0, rbin, torch.ones(len(r), dtype=torch.float64))
    # vertical-slash: the best columns and diagonals over the sampled rows, half the keys each
    n_vert = max(1, keys // 2)
    n_slash = max(1, keys - n_vert)
    cols = col_mass.topk(min(n_vert, nk), dim=-1).indices  # (Hq, V)
    diags = diag_mass.topk(min(n_slash, nk), dim=-1).indices  # (Hq, S)
    vs = z(hq)
    col_sel = torch.zeros(hq, nk, dtype=torch.bool).scatter_(1, cols, True)
    diag_sel = torch.zeros(hq, nk, dtype=torch.bool).scatter_(1, diags, True)
    for r0 in range(0, nr, chunk):
        r = rows[r0:r0 + chunk]
        pos = r + off
        p = _probs(q64, k64, r, scale, mask).mean(0)
        offset = (pos[:, None] - kpos[None, :]).clamp_min(0)
        on_diag = torch.gather(diag_sel, 1, offset.flatten()[None].expand(hq, -1)).view(hq, len(r), nk)
        vs += (p * (col_sel[:, None, :] | on_diag)).sum((1, 2))
    recall = torch.stack([a_shape, vs, block], dim=-1) / nr
    pattern = _pick(recall, tie)
    # hidden sinks (ACT): mean score over the rows that see the key from outside their local
    # window > alpha x uniform, on keys seen so by at least an eighth of the sampled rows
    ratio = col_ratio / col_rows.clamp_min(1)
    mean_mass = col_mass / col_rows.clamp_min(1)
    hidden, hidden_mass = [], z(hq)
    for h in range(hq):
        idx = torch.nonzero((ratio[h] > alpha) & (kpos >= sink_tokens) & (col_rows >= max(1, nr // 8))).flatten()
        hidden_mass[h] = col_mass[h, idx].sum() / nr
        order = mean_mass[h, idx].argsort(descending=True)[:max_hidden]
        hidden.append([[int(idx[i]), float(mean_mass[h, idx[i]])] for i in order])
    return {"sink": sink / nr, "entropy": ent / nr, "entropy_norm": ent_norm / max(norm_rows, 1),
            "streaming": stream / nr, "hidden_sink_mass": hidden_mass, "hidden_sinks": hidden,
            "pattern_recall": recall, "pattern": pattern, "rows": nr,
            **({"map": amap / map_rows[None, :, None]} if map_bins else {})}


def _pick(recall: torch.Tensor, tie: float) -> torch.Tensor:
    """(Hq,) index into PATTERNS: the best recall; within ``tie`` the cheaper (lower index)."""
    best = recall.max(dim=-1, keepdim=True).values
    return (recall >= best - tie).double().argmax(dim=-1)
