"""Expected Attention: score each key by the attention future queries are expected to pay it.

Paper: Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention
from Future Queries Distribution", arXiv:2510.00636 (2025) — kvpress's
``ExpectedAttentionPress`` (NVIDIA/kvpress). Rule: model the queries as Gaussian,
mean ``mu`` and covariance ``S`` (per query head, before RoPE); rotate them by the
average RoPE rotation ``R`` of the next ``n_future_positions`` positions
(``mu' = R mu``, ``S' = R S R^T``); a key's expected attention logit is
``mu'.k / sqrt(d) + k^T S' k / (2 d)`` (the Gaussian moment-generating function), turned
into a softmax over the keys; scores are averaged over each KV head's query heads and
multiplied by the value norm, ``(score + epsilon) * ||v||``. The first ``n_sink`` tokens
are excluded from the softmax and always kept.

Deviations from kvpress: the query statistics come from the last ``window`` queries the
layer actually ran (RoPE removed at their own positions) instead of projecting every
prompt hidden state again, so nothing N x d is stored; sinks are kept with +inf (kvpress
pads them with the maximum score). The RoPE base is the model's (read by attnkit's
attention from the module config) unless ``rope_theta`` is given; standard
(non-interleaved, "rotate_half") RoPE without scaling is assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ... import validate
from ...registry import register
from .base import CachePolicy, LayerView
from .common import group_mean, protect, sink_mask


def rope_cos_sin(positions: torch.Tensor, d: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(P,) positions -> cos, sin (P, d) in transformers' rotate_half layout, float64."""
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d)
    ang = positions.double()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def mean_rotation(start: int, n: int, d: int, theta: float, device: torch.device) -> torch.Tensor:
    """(d, d) average of the RoPE rotation matrices of positions start .. start + n - 1."""
    cos, sin = rope_cos_sin(torch.arange(start, start + n, device=device), d, theta)
    eye = torch.eye(d, dtype=torch.float64, device=device)
    p = rotate_half(eye).T  # p @ x == rotate_half(x)
    return cos.mean(0)[:, None] * eye + sin.mean(0)[:, None] * p


@register("expected_attention", family="kv_cache",
          paper="Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution",
          arxiv="2510.00636", year=2025, supports=("causal", "decode", "gqa"), kinds=("cache",))
class ExpectedAttention(CachePolicy):
    """Expected attention of future queries (Gaussian, RoPE-rotated) times value norm."""

    @dataclass
    class Config:
        window: int = 64
        n_future_positions: int = 512
        n_sink: int = 4
        use_covariance: bool = True
        use_vnorm: bool = True
        epsilon: float = 0.0
        rope_theta: Optional[float] = None

    def always_kept(self) -> tuple[int, str]:
        return self.config.n_sink, f"attention sinks, n_sink={self.config.n_sink}"

    def check_config(self) -> None:
        c = self.config
        validate.check_positive(self.name, window=c.window, n_future_positions=c.n_future_positions)
        if not isinstance(c.n_sink, int) or c.n_sink < 0:
            raise ValueError(f"expected_attention: n_sink must be an int >= 0, got {c.n_sink!r}")

    def obs_window(self) -> int:
        return self.config.window

    def score(self, view: LayerView) -> torch.Tensor:
        c = self.config
        theta = c.rope_theta or view.rope_theta or 10000.0
        q, qpos = view.queries.double(), view.query_positions
        b, hq, w, d = q.shape
        hkv = view.keys.shape[1]
        cos, sin = rope_cos_sin(qpos, d, theta)
        q = q * cos - rotate_half(q) * sin  # RoPE removed: the rotation by -position
        mu = q.mean(dim=2)  # (B, Hq, d)
        rot = mean_rotation(view.seen, c.n_future_positions, d, theta, q.device)
        mu = mu @ rot.T
        k = view.keys.double().repeat_interleave(hq // hkv, dim=1)  # (B, Hq, L, d)
        logits = (k @ mu[..., None])[..., 0] / math.sqrt(d)
        if c.use_covariance:
            x = q - q.mean(dim=2, keepdim=True)
            cov = x.transpose(-1, -2) @ x / w  # (B, Hq, d, d)
            cov = rot @ cov @ rot.T
            logits = logits + ((k @ cov) * k).sum(dim=-1) / (2 * d)
        sinks = sink_mask(view, c.n_sink)
        hide = (~view.valid | sinks).repeat_interleave(hq // hkv, dim=1)
        probs = torch.softmax(logits.masked_fill(hide, float("-inf")), dim=-1).nan_to_num(0.0)
        scores = group_mean(probs, hkv)
        if c.use_vnorm:
            scores = (scores + c.epsilon) * view.values.double().norm(dim=-1)
        return protect(scores.float(), sinks)
