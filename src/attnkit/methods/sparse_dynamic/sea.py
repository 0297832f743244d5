"""SEA: a linear-attention estimate of the attention map, top-k per query, then sparse attention.

Paper: Lee et al., "SEA: Sparse Linear Attention with Estimated Attention Mask",
arXiv:2310.01777 (ICLR 2024). SEA runs a kernel-based linear attention to estimate the
attention matrix at a compressed key resolution, keeps the top-k entries of each query
row of the estimate, and computes exact sparse attention on that mask. Its estimator is
*trained* by distillation from the model's own attention.

Here, per batch, KV head and query block of ``block_size`` queries, the estimated
attention mass of each chunk of ``chunk`` consecutive keys is
    P(block, J) = sum_{i in block} phi(q_i) . S_J / phi(q_i) . S_vis(i),   S_J = sum_{j in J} phi(k_j),
with S_vis(i) the sum of phi(k) over the keys query i may see (a prefix sum under causal
masking) — query i's linear-attention row, summed over the chunk and over the block's
queries (and over the query heads of the KV head). The ``topk / chunk`` chunks of largest
estimated mass among the block's candidates are kept; the block attends to exactly those
``topk`` keys beside a sink and a local band (``KeySlotMethod``, shared with ``hip``:
candidates, key slots, log-sum-exp merge with the anchors). Nothing N x N is built: per
group of query blocks the estimate is a (blocks x F) @ (F x chunks) product.

Two feature maps phi:
- ``estimator=""`` (default, training-free): the Performer FAVOR+ positive random
  features phi(x) = exp(W x' - |x'|^2 / 2) with W ~ N(0, I) (``features`` rows, seeded)
  and x' = x scale^(1/2), so that E[phi(q) . phi(k)] = exp(scale q . k).
- ``estimator=PATH, layer=i``: a feature map *trained* by distillation, as in the paper —
  phi(x) = [softmax(W x), softmax(-W x)] (the Hedgehog map, Zhang et al., arXiv:2402.04347,
  trained to mimic softmax attention) with one W per query head and per KV head, fitted by
  ``calibrate`` on the model's own q/k from calibration text (cross-entropy between the
  exact attention rows and the linear-attention rows) and stored by ``save_estimator``.
  ``attnkit calibrate-sea`` writes one for a model; ``attnkit.apply`` and the benchmark's
  fidelity task fill ``layer`` with each layer's index. ``features`` and ``seed`` then do
  not apply (the file fixes M).

Deliberate deviations: no CNN decoder (the estimate is read at chunk resolution
directly); the paper's distilled Performer is replaced by a distilled Hedgehog map, and the
training-free default uses untrained random features; top-k is taken per query *block* of
64 (the kernel's tile) over chunks of 8 keys instead of per query over K compressed
columns; ``sink`` / ``local`` anchors (StreamingLLM's) are not in the paper; one key set
per KV head (a GQA group's estimates are summed). Defaults: block_size 64, topk 512 keys,
chunk 8, features 64, sink 64, local 256.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ... import validate
from ...kernels.pattern import cdiv
from ...registry import register
from ..calibration_file import load_layers, save_layers
from .key_slots import KeySlotMethod

ESTIMATOR_VERSION = 1


@register(
    "sea",
    family="dynamic_sparse",
    paper="SEA: Sparse Linear Attention with Estimated Attention Mask",
    arxiv="2310.01777",
    year=2023,
)
class SEA(KeySlotMethod):
    """Top-k key chunks per query block from a linear-attention estimate of attention."""

    @dataclass
    class Config:
        block_size: int = 64
        topk: int = 512
        chunk: int = 8
        features: int = 64
        seed: int = 0
        sink: int = 64
        local: int = 256
        estimator: str = ""
        layer: int | None = None  # whose maps of the estimator (set per layer by apply / bench; unused without one)

    def check_config(self) -> None:
        c = self.config
        validate.check_positive(self.name, block_size=c.block_size, topk=c.topk, chunk=c.chunk, features=c.features)
        validate.check_non_negative(self.name, sink=c.sink, local=c.local)
        if c.layer is not None:
            validate.check_non_negative(self.name, layer=c.layer)
        if c.topk % c.chunk:
            raise ValueError(f"topk of method {self.name!r} must be a multiple of chunk ({c.chunk}): it counts the "
                             f"keys of topk / chunk kept chunks; got topk={c.topk}")
        self.trained = None
        if c.estimator:
            est = load_estimator(c.estimator)
            if c.layer is not None and c.layer not in est["layers"]:
                raise ValueError(f"layer={c.layer} of method {self.name!r} is not in estimator {c.estimator!r}: "
                                 f"it has layers {sorted(est['layers'])}")
            self.trained = est["layers"].get(c.layer)

    def group_width(self, nk: int) -> int:
        return max(2 * (self.config.topk // self.config.chunk), cdiv(nk, self.config.chunk))

    def prepare(self, q, k, causal, scale):
        query_map, phi_k = self._feature_maps(q, k, scale)
        base = min(self.config.sink, k.shape[2])
        tail = phi_k[:, :, base:]
        n_chunks = cdiv(tail.shape[2], self.config.chunk)
        tail = F.pad(tail, (0, 0, 0, n_chunks * self.config.chunk - tail.shape[2]))
        chunk_sums = tail.view(*tail.shape[:2], n_chunks, self.config.chunk, tail.shape[-1]).sum(3)  # (B, Hkv, nC, F)
        visible = phi_k.cumsum(dim=2) if causal else phi_k.sum(dim=2, keepdim=True)
        return _State(query_map, visible, chunk_sums, causal, q.shape[2], k.shape[2])

    def pick_chunks(self, state, q_tiles, keys, first_block, base, count, scale):
        c = self.config
        fq = state.query_map(q_tiles)  # (B, Hkv, nb, R, F)
        vis = state.visible_sums(first_block, q_tiles.shape[2], q_tiles.shape[3], c.block_size)
        denom = (fq * vis).sum(-1, keepdim=True).clamp(min=1e-30)
        weights = (fq / denom).sum(3)  # (B, Hkv, nb, F): the block's summed linear-attention rows
        mass = torch.matmul(weights, state.chunk_sums.transpose(-1, -2))  # (B, Hkv, nb, nC)
        starts = torch.arange(mass.shape[-1], device=mass.device) * c.chunk
        usable = starts.view(1, -1) < count.view(-1, 1)  # (nb, nC): chunk begins inside the candidates
        mass = mass.masked_fill(~usable, float("-inf"))
        best = mass.topk(min(c.topk // c.chunk, mass.shape[-1]), dim=-1)
        lo = base + best.indices * c.chunk
        hi = torch.minimum(lo + c.chunk, base + count.view(1, 1, -1, 1))
        return lo, torch.where(torch.isinf(best.values), lo, hi)

    def _feature_maps(self, q, k, scale) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        """(query map over (B, Hkv, nb, R, D) tiles, key features (B, Hkv, Nk, F))."""
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
        if self.config.estimator and self.trained is None:
            raise ValueError(f"method {self.name!r} with estimator {self.config.estimator!r} needs layer=i, the model "
                             "layer whose maps to use (attnkit.apply and the benchmark set it for each layer)")
        if self.trained is None:
            gen = torch.Generator().manual_seed(self.config.seed)
            w = torch.randn(self.config.features, d, generator=gen).to(q.device)
            lk = random_features(k, w, scale)
            phi_k = (lk - lk.amax(dim=(2, 3), keepdim=True)).exp()  # a per-head constant cancels

            def query_map(tiles: torch.Tensor) -> torch.Tensor:
                lq = random_features(tiles, w, scale)
                return (lq - lq.amax(dim=-1, keepdim=True)).exp()  # a per-query constant cancels

            return query_map, phi_k
        wq, wk = self.trained["wq"].to(q.device), self.trained["wk"].to(k.device)
        if wq.shape[0] != hq or wk.shape[0] != hkv or wq.shape[-1] != d:
            raise ValueError(f"estimator {self.config.estimator!r} layer {self.config.layer} was calibrated for "
                             f"{wq.shape[0]} query heads, {wk.shape[0]} KV heads and head dim {wq.shape[-1]}; "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
        phi_k = hedgehog_features(k.float(), wk.view(1, hkv, *wk.shape[1:]))

        def query_map(tiles: torch.Tensor) -> torch.Tensor:
            b, h, nb, rows, _ = tiles.shape
            group = hq // hkv
            per_head = tiles.view(b, h, nb, group, rows // group, d).transpose(2, 3)  # (B, Hkv, group, nb, block, D)
            w = wq.view(1, hkv, group, *wq.shape[1:])  # (1, Hkv, group, M, D)
            f = hedgehog_features(per_head.reshape(b, h, group, nb * (rows // group), d), w)
            return f.view(b, h, group, nb, rows // group, -1).transpose(2, 3).reshape(b, h, nb, rows, -1)

        return query_map, phi_k


@dataclass
class _State:
    """Per-call estimate inputs: the query feature map, visible-key sums, chunk sums."""

    query_map: Callable[[torch.Tensor], torch.Tensor]
    visible: torch.Tensor  # (B, Hkv, Nk, F) prefix sums (causal) or (B, Hkv, 1, F) totals
    chunk_sums: torch.Tensor  # (B, Hkv, nC, F), chunks from the first candidate key
    causal: bool
    nq: int
    nk: int

    def visible_sums(self, first_block: int, nb: int, rows: int, block: int) -> torch.Tensor:
        """S_vis of each tile row: (B, Hkv, nb, R, F) (a broadcastable total when non-causal)."""
        if not self.causal:
            return self.visible.unsqueeze(2)
        t = torch.arange(rows, device=self.visible.device) % block
        qi = ((torch.arange(nb, device=t.device) + first_block) * block).view(-1, 1) + t  # (nb, R)
        pos = (qi.clamp(max=self.nq - 1) + self.nk - self.nq).reshape(-1)
        b, h, _, f = self.visible.shape
        return self.visible[:, :, pos].view(b, h, nb, rows, f)


def random_features(x: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """log of FAVOR+ positive features, (..., N, m): W x' - |x'|^2 / 2 with x' = x scale^(1/2)."""
    xs = x.float() * scale**0.5
    return torch.matmul(xs, w.t()) - 0.5 * (xs * xs).sum(-1, keepdim=True)


def hedgehog_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Hedgehog feature map [softmax(W x), softmax(-W x)]. x: (..., H, N, D), w: (..., H, M, D)
    broadcastable over the leading dims -> (..., H, N, 2M)."""
    z = torch.matmul(x, w.transpose(-1, -2))
    return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


# --- the trained estimator: calibration, files ------------------------------------------


def calibrate(
    captured: dict[int, dict[str, Any]],
    features: int = 64,
    steps: int = 200,
    rows: int = 128,
    lr: float = 0.02,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Fit SEA's feature maps to a model's attention (distillation, as the paper trains SEA).

    captured: {layer: {"q": (1, Hq, N, D), "k": (1, Hkv, N, D), "scale": float or None}},
    e.g. ``attnkit.bench.tasks.fidelity.capture_qkv`` on calibration text (causal). Per
    step, ``rows`` random query rows (from N / 8 on) of every head: loss = cross-entropy
    between the exact causal attention row and the Hedgehog linear-attention row. Adam,
    ``steps`` steps per layer. ``progress(layer, step, loss)`` is called every step.
    Returns {layer: {"wq": (Hq, features, D), "wk": (Hkv, features, D), "loss": (2,) first
    and last step's loss}}. Cost per step: Hq x rows x N scores (calibration-sized N).
    """
    if features < 1 or steps < 1 or rows < 1:
        raise ValueError(f"features, steps and rows must be >= 1, got {features}, {steps}, {rows}")
    out = {}
    for layer, cap in captured.items():
        out[int(layer)] = _fit_layer(cap, features, steps, rows, lr, seed, lambda s, v, i=int(layer): progress and progress(i, s, v))
    return out


def _fit_layer(cap: dict[str, Any], features: int, steps: int, rows: int, lr: float, seed: int, report) -> dict:
    q, k = cap["q"][0].float().clone(), cap["k"][0].float().clone()  # clone: captures may be inference tensors
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] % k.shape[0] or q.shape[1] != k.shape[1]:
        raise ValueError(f"calibrate: need q (1, Hq, N, D) and k (1, Hkv, N, D) of one causal sequence, "
                         f"got {tuple(cap['q'].shape)} and {tuple(cap['k'].shape)}")
    hq, n, d = q.shape
    hkv = k.shape[0]
    scale = cap.get("scale") or d**-0.5
    gen = torch.Generator().manual_seed(seed)
    wq = (torch.randn(hq, features, d, generator=gen) * d**-0.5).requires_grad_()
    wk = (torch.randn(hkv, features, d, generator=gen) * d**-0.5).requires_grad_()
    opt = torch.optim.Adam([wq, wk], lr=lr)
    k_rep = k.repeat_interleave(hq // hkv, dim=0)
    first = None
    for step in range(steps):
        idx = torch.randint(n // 8, n, (rows,), generator=gen)
        visible = torch.arange(n)[None, :] <= idx[:, None]  # (rows, N)
        target = torch.softmax((torch.matmul(q[:, idx], k_rep.transpose(1, 2)) * scale).masked_fill(~visible, -math.inf), -1)
        fk = hedgehog_features(k, wk).repeat_interleave(hq // hkv, dim=0)  # (Hq, N, 2M)
        est = torch.matmul(hedgehog_features(q[:, idx], wq), fk.transpose(1, 2)).masked_fill(~visible, 0.0)
        est = est / est.sum(-1, keepdim=True).clamp(min=1e-30)
        loss = -(target * (est + 1e-12).log()).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.item()
        first = value if first is None else first
        report(step, value)
    return {"wq": wq.detach(), "wk": wk.detach(), "loss": torch.tensor([first, value])}


def save_estimator(path: str, layers: dict[int, dict[str, torch.Tensor]], **meta: Any) -> None:
    """Write a trained estimator (from ``calibrate``) for ``sea(estimator=PATH, layer=i)``."""
    save_layers(path, "sea", ESTIMATOR_VERSION, layers, ("wq", "wk"), **meta)


def _check_estimator_entry(entry: dict, where: str) -> None:
    wq, wk = entry.get("wq"), entry.get("wk")
    if not (isinstance(wq, torch.Tensor) and isinstance(wk, torch.Tensor) and wq.dim() == 3 and wk.dim() == 3
            and wq.shape[1:] == wk.shape[1:] and wq.shape[0] % wk.shape[0] == 0):
        raise ValueError(f"{where}: need wq (Hq, M, D) and wk (Hkv, M, D)")


def load_estimator(path: str) -> dict:
    """Read a file written by ``save_estimator`` (cached per path and modification time)."""
    return load_layers(path, "sea", ESTIMATOR_VERSION, noun="estimator file",
                       missing_hint=f"run `attnkit calibrate-sea --out {path}` first "
                                    "(or attnkit.methods.sparse_dynamic.sea.calibrate + save_estimator)",
                       what="a SEA estimator (written by save_estimator)", check_entry=_check_estimator_entry)
