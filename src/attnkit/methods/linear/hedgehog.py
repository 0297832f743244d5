"""Hedgehog: a learnable feature map trained to mimic softmax attention.

Paper: Zhang, Bhatia, Kumbong, Ré, "The Hedgehog & the Porcupine: Expressive Linear
Attentions with Softmax Mimicry", arXiv:2402.04347 (ICLR 2024).

phi(x) = softmax([x W + b, -(x W + b)]) (one softmax over the 2M features: the paper's
[exp(x W + b), exp(-(x W + b))] divided by its sum, the numerically stable form the
Hedgehog feature-map code uses; a per-token factor, which cancels for queries), one
(W (D, M), b (M)) per query head for q and one per key/value head for k, as the paper
trains separate maps for queries and keys.
o_i = scale phi_q(q_i)^T S_i / (scale phi_q(q_i)^T z_i + eps) (j <= i causal, every j
non-causal).

Distillation (the paper's softmax mimicry): ``distill(q, k, steps, lr)`` fits the maps on
captured q, k by minimising the cross-entropy between the softmax attention rows
softmax(q k^T / sqrt(D)) and the linear-attention weights phi(q_i) . phi(k_j) / sum_j (causal
mask when asked), with Adam; ``save_maps`` / ``load_maps`` store them per layer, and
``hedgehog(maps=PATH, layer=i)`` uses the file's layer i (the pattern of ``sea``'s
estimator). ``maps`` may also be the dict ``distill`` returns. Without maps the map is
the paper's initialisation: W = identity (M = Dk), b = 0, untrained.
Deviations: the operator only (the paper distils layer by layer inside a model and then
fine-tunes; here ``distill`` takes one layer's q, k); ``eps`` 1e-12 keeps a zero
denominator finite; ``scale`` (default 1) multiplies phi(q) and cancels in the
normalisation. State: ``LinearState`` (S (B, Hkv, 2M, Dv), z (B, Hkv, 2M)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from ...registry import register
from ..calibration_file import load_layers, save_layers
from .base import LinearConfig, LinearMethod, run_normalized
from .state import LinearState, state_dtype

MAPS_VERSION = 1
MAP_KEYS = ("wq", "bq", "wk", "bk")


def features(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x: (B, H, N, D); w: (H, D, M); b: (H, M) -> (B, H, N, 2M): softmax([xW + b, -(xW + b)])."""
    z = x @ w + b[:, None, :]
    return torch.softmax(torch.cat([z, -z], dim=-1), dim=-1)


def identity_maps(hq: int, hkv: int, d: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The paper's initialisation: W = I (M = D), b = 0, for every head."""
    eye = torch.eye(d, dtype=dtype)
    return {"wq": eye.repeat(hq, 1, 1), "bq": torch.zeros(hq, d, dtype=dtype),
            "wk": eye.repeat(hkv, 1, 1), "bk": torch.zeros(hkv, d, dtype=dtype)}


def mimicry_loss(q: torch.Tensor, k: torch.Tensor, maps: dict[str, torch.Tensor], causal: bool = True,
                 scale: Optional[float] = None) -> torch.Tensor:
    """Cross-entropy between softmax attention and the Hedgehog linear-attention weights,
    averaged over query rows. q: (B, Hq, N, D); k: (B, Hkv, N, D). Builds (N, N): for
    calibration-sized N."""
    n, d = q.shape[2], q.shape[3]
    grp = q.shape[1] // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    k_rep = k.repeat_interleave(grp, dim=1)
    scores = (q @ k_rep.transpose(-1, -2)) * scale
    fq = features(q, maps["wq"], maps["bq"])
    fk = features(k, maps["wk"], maps["bk"]).repeat_interleave(grp, dim=1)
    weights = fq @ fk.transpose(-1, -2)
    if causal:
        tril = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~tril, -math.inf)
        weights = weights.masked_fill(~tril, 0.0)
    target = torch.softmax(scores, dim=-1)
    est = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
    return -(target * (est + 1e-12).log()).sum(-1).mean()


def distill(q: torch.Tensor, k: torch.Tensor, steps: int = 200, lr: float = 0.01, causal: bool = True,
            scale: Optional[float] = None, init: Optional[dict] = None,
            progress: Optional[Callable[[int, float], None]] = None) -> dict[str, torch.Tensor]:
    """Fit Hedgehog maps to mimic softmax attention on captured q, k (one layer).

    q: (B, Hq, N, D); k: (B, Hkv, N, D) (e.g. ``attnkit.bench.tasks.fidelity.capture_qkv``).
    Adam on ``mimicry_loss`` (full rows, ``steps`` steps) from ``init`` (default: the
    identity maps). Returns {"wq" (Hq, D, M), "bq" (Hq, M), "wk" (Hkv, D, M), "bk" (Hkv, M),
    "loss" (2,) first and last step's loss}, float32 (float64 for float64 inputs)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"distill: steps must be an integer >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"distill: lr must be > 0, got {lr!r}")
    if q.dim() != 4 or k.dim() != 4 or q.shape[1] % k.shape[1] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"distill: need q (B, Hq, N, D) and k (B, Hkv, N, D) with Hq % Hkv == 0, "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    dtype = state_dtype(q.dtype)
    q, k = q.detach().to(dtype).clone(), k.detach().to(dtype).clone()  # clone: captures may be inference tensors
    start = init or identity_maps(q.shape[1], k.shape[1], q.shape[-1], dtype)
    params = {name: start[name].detach().to(dtype).clone().requires_grad_() for name in MAP_KEYS}
    opt = torch.optim.Adam(params.values(), lr=lr)
    first = value = None
    with torch.enable_grad():
        for step in range(steps):
            loss = mimicry_loss(q, k, params, causal, scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            value = loss.item()
            first = value if first is None else first
            if progress:
                progress(step, value)
    out = {name: p.detach() for name, p in params.items()}
    out["loss"] = torch.tensor([first, value])
    return out


def save_maps(path: str, layers: dict[int, dict[str, torch.Tensor]], **meta: Any) -> None:
    """Write distilled maps ({layer: distill's dict}) for ``hedgehog(maps=PATH, layer=i)``."""
    save_layers(path, "hedgehog", MAPS_VERSION, layers, MAP_KEYS, **meta)


def load_maps(path: str) -> dict:
    """Read a file written by ``save_maps`` (cached per path and modification time)."""
    return load_layers(path, "hedgehog", MAPS_VERSION, noun="hedgehog maps file",
                       missing_hint="write one with attnkit.methods.linear.hedgehog.distill + save_maps",
                       what="a hedgehog maps file (written by save_maps)", check_entry=_check_maps)


def _check_maps(maps: Any, where: str) -> None:
    ok = isinstance(maps, dict) and all(isinstance(maps.get(n), torch.Tensor) for n in MAP_KEYS)
    if ok:
        wq, bq, wk, bk = (maps[n] for n in MAP_KEYS)
        ok = (wq.dim() == 3 and wk.dim() == 3 and wq.shape[1:] == wk.shape[1:] and wq.shape[0] % wk.shape[0] == 0
              and tuple(bq.shape) == (wq.shape[0], wq.shape[2]) and tuple(bk.shape) == (wk.shape[0], wk.shape[2]))
    if not ok:
        raise ValueError(f"{where}: need wq (Hq, D, M), bq (Hq, M), wk (Hkv, D, M), bk (Hkv, M)")


@register(
    "hedgehog",
    family="linear",
    paper="The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry",
    arxiv="2402.04347",
    year=2024,
    supports=("causal", "non_causal", "decode", "gqa"),
)
class Hedgehog(LinearMethod):
    """Linear attention on a learned softmax-mimicking feature map (``distill``, ``maps=``)."""

    State = LinearState
    unit_scale = True

    @dataclass
    class Config(LinearConfig):
        maps: Union[str, dict] = ""
        layer: Optional[int] = None
        eps: float = 1e-12

    def check_config(self) -> None:
        super().check_config()
        c = self.config
        if not c.eps >= 0:
            raise ValueError(f"eps of method 'hedgehog' must be >= 0, got {c.eps!r}")
        if c.layer is not None and (isinstance(c.layer, bool) or not isinstance(c.layer, int)):
            raise ValueError(f"layer of method 'hedgehog' must be an integer or None, got {c.layer!r}")
        if isinstance(c.maps, dict):
            _check_maps(c.maps, "maps of method 'hedgehog'")
        elif not isinstance(c.maps, str):
            raise ValueError(f"maps of method 'hedgehog' must be a file path (save_maps) or distill's dict, "
                             f"got {type(c.maps).__name__}")

    def _maps(self, q, k) -> dict[str, torch.Tensor]:
        c = self.config
        if isinstance(c.maps, dict):
            maps = c.maps
        elif c.maps:
            layers = load_maps(c.maps)["layers"]
            if c.layer is None and len(layers) == 1:
                maps = next(iter(layers.values()))
            elif c.layer in layers:
                maps = layers[c.layer]
            else:
                raise ValueError(f"method 'hedgehog': maps file {c.maps!r} holds layers {sorted(layers)}; "
                                 f"pass layer=i (got {c.layer!r})")
        else:
            return identity_maps(q.shape[1], k.shape[1], q.shape[-1])
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
        if maps["wq"].shape[:2] != (hq, d) or maps["wk"].shape[:2] != (hkv, d):
            raise ValueError(f"method 'hedgehog': the maps are for {maps['wq'].shape[0]} query / {maps['wk'].shape[0]} "
                             f"key heads of dim {maps['wq'].shape[1]}, the inputs have {hq} / {hkv} of dim {d}")
        return maps

    def state_shapes(self, q, k, v):
        m = self._maps(q, k)["wk"].shape[-1]
        b, h, dv = k.shape[0], k.shape[1], v.shape[-1]
        return {"S": (b, h, 2 * m, dv), "z": (b, h, 2 * m)}

    def check_inputs(self, q, k, v, causal, inputs, check_finite=True):
        self._maps(q, k)  # head counts / dims, before a state check quotes M
        super().check_inputs(q, k, v, causal, inputs, check_finite)

    def run(self, q, k, v, causal, scale, form, inputs):
        dtype = state_dtype(q.dtype)
        maps = {name: t.to(dtype=dtype, device=q.device) for name, t in self._maps(q, k).items() if name in MAP_KEYS}
        fq = features(q.to(dtype), maps["wq"], maps["bq"])
        fk = features(k.to(dtype), maps["wk"], maps["bk"])
        state = inputs.get("initial_state")
        s0, z0 = (None, None) if state is None else (state.S, state.z)
        out, s, z = run_normalized(form, fq, fk, v.to(dtype), s0, z0, causal, self.config.chunk_size,
                                   self.config.eps, scale)
        return out, LinearState(S=s, z=z)
