"""Agent attention: n agent tokens A aggregate from the keys, then broadcast to the queries.

Paper: Han, Ye, Han, Xia, Pan, Wan, Song, Huang, "Agent Attention: On the Integration of
Softmax and Linear Attention", arXiv:2312.08275 (2023).

    agent aggregation  V_A = softmax(scale A K^T) V                 (n, Dv)
    agent broadcast    out = softmax(scale Q A^T) V_A                (Nq, Dv)

A: the queries pooled to ``agents`` tokens per query head (adaptive average pooling
along the sequence: agent a is the mean of rows floor(a N / n) .. ceil((a + 1) N / n) - 1),
as the paper's code pools q (``AdaptiveAvgPool2d`` over the image grid, 49 = 7 x 7 agents
by default). Cost O(N n D), memory O(N n): linear in N for a fixed n. GQA: each query
head pools its own agents and reads the keys / values of its KV head.

Non-causal only, as published: the paper's code (LeapLabTHU/Agent-Attention: DeiT, PVT,
Swin, CSwin, AgentSD) has no causal variant (agents pooled over the whole sequence see the
future), so causal=True is an error. Deviations: the sequence is 1-D (the paper pools a
2-D image grid); the agent bias (learned position biases, interpolated over the image
window) and the depthwise convolution (DWC) of V added to the output are learned layer
parameters tied to the 2-D grid and are omitted: this is the attention operator
sigma(Q A^T) sigma(A K^T) V alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import validate
from ...registry import register
from .quadratic import QuadraticMethod
from .state import state_dtype


def pool_agents(q: torch.Tensor, agents: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, n, D): the mean of the queries over n segments of the sequence."""
    b, h, n, d = q.shape
    pooled = F.adaptive_avg_pool1d(q.reshape(b * h, n, d).transpose(1, 2), agents)
    return pooled.transpose(1, 2).reshape(b, h, agents, d)


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: int, scale: float) -> torch.Tensor:
    """q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv) in the
    compute dtype (float32, float64 for float64). Differentiable through autograd."""
    dtype = state_dtype(q.dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    b, hq, nq, d = q.shape
    heads = k.shape[1]
    group = hq // heads
    a = pool_agents(q, agents) * scale  # (B, Hq, n, D)
    # aggregation: the G query heads' agents of a KV head as rows of one matmul
    a_rows = a.view(b, heads, group * agents, d)
    agent_v = torch.softmax(torch.matmul(a_rows, k.transpose(-1, -2)), dim=-1) @ v  # (B, Hkv, G n, Dv)
    agent_v = agent_v.view(b, heads, group, agents, v.shape[-1])
    # broadcast: each query head against its own agents
    weights = torch.softmax(torch.matmul(q.view(b, heads, group, nq, d), a.view(b, heads, group, agents, d).transpose(-1, -2)),
                            dim=-1)
    return (weights @ agent_v).reshape(b, hq, nq, v.shape[-1])


@register(
    "agent",
    family="linear",
    paper="Agent Attention: On the Integration of Softmax and Linear Attention",
    arxiv="2312.08275",
    year=2023,
    supports=("non_causal", "gqa"),
)
class AgentAttention(QuadraticMethod):
    """Softmax attention through n pooled agent tokens: softmax(Q A^T) softmax(A K^T) V."""

    @dataclass
    class Config:
        agents: int = 49  # the paper's code: agent_num=49 (7 x 7 pooled queries)

    def check_config(self) -> None:
        validate.check_positive(self.name, agents=self.config.agents)

    def _check_supported(self, causal: bool, gqa: bool) -> None:
        if causal:
            raise ValueError("method 'agent' is non-causal only, as published: its agents are pooled over the whole "
                             "query sequence (they see the future) and the paper's code has no causal variant; "
                             "use causal=False")
        super()._check_supported(causal, gqa)

    def run(self, q, k, v, causal, scale):
        return agent_attention(q, k, v, self.config.agents, scale).to(q.dtype), float("nan")
