"""The oracle: dense masked attention in float64 from an explicit boolean mask.

Every method is tested against this function; nothing here is optimised. It builds the
full Nq x Nk score matrix on purpose.
"""

from __future__ import annotations

import math

import torch


def causal_mask(nq: int, nk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(Nq, Nk) bool: query i (the (Nk - Nq + i)-th position) may see key j iff j <= Nk - Nq + i."""
    offset = nk - nq
    i = torch.arange(nq, device=device)[:, None] + offset
    j = torch.arange(nk, device=device)[None, :]
    return j <= i


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale, masked) v in float64.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) with Hq % Hkv == 0.
    mask: bool, broadcastable to (B, Hq, Nq, Nk), True = may attend; ANDed with the
    bottom-right aligned causal mask when ``causal``.
    Returns (B, Hq, Nq, Dv) float64, and with ``return_lse`` the log-sum-exp (B, Hq, Nq)
    float64 of each row's scaled, allowed scores. A query row with no allowed key is a
    ValueError, unless ``return_lse``: then it gets out 0 and lse -inf (the convention of
    partial attention). Differentiable (autograd through these plain ops).
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    q64, k64, v64 = q.double(), k.double(), v.double()
    k64 = k64.repeat_interleave(group, dim=1)
    v64 = v64.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    allowed = torch.ones(b, hq, nq, nk, dtype=torch.bool, device=q.device)
    if mask is not None:
        allowed = allowed & mask.to(device=q.device, dtype=torch.bool)
    if causal:
        allowed = allowed & causal_mask(nq, nk, q.device)
    empty = ~allowed.any(dim=-1)
    if bool(empty.any()) and not return_lse:
        bb, hh, ii = (int(x) for x in empty.nonzero()[0])
        raise ValueError(f"reference_attention: query row {ii} (batch {bb}, head {hh}) has no allowed key")
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - 0) = 0 on empty rows: out 0 there, and finite gradients elsewhere
    probs = torch.exp(scores - torch.where(empty, 0.0, lse).unsqueeze(-1))
    out = torch.matmul(probs, v64)
    return (out, lse) if return_lse else out


# === Delta-rule family: per-token recurrences =========================================
# The definition of delta / gated_delta / kda (attnkit.methods.linear.delta_rule), one
# token at a time in float64, written as the matrix recurrence of the papers.


def reference_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule in float64, one token at a time:

        S_t = (I - b_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T q_t.

    q, k: (B, Hk, N, Dk); v: (B, Hv, N, Dv), Hv % Hk == 0 (value head h reads key head
    h // (Hv / Hk)); g: None (DeltaNet), (B, Hv, N) (Gated DeltaNet) or (B, Hv, N, Dk)
    (KDA), log-space; beta: (B, Hv, N); initial_state: (B, Hv, Dk, Dv). q and k are first
    L2-normalised when ``use_qk_l2norm`` (x * rsqrt(sum x^2 + 1e-6)), q then scaled by
    ``scale`` (default Dk^-0.5). Returns out (B, Hv, N, Dv) and the final state
    (B, Hv, Dk, Dv), both float64.
    """
    q64, k64, v64, b64 = q.double(), k.double(), v.double(), beta.double()
    bsz, hk, n, dk = q.shape
    hv, dv = v.shape[1], v.shape[3]
    if use_qk_l2norm:
        q64 = q64 * torch.rsqrt((q64 * q64).sum(-1, keepdim=True) + 1e-6)
        k64 = k64 * torch.rsqrt((k64 * k64).sum(-1, keepdim=True) + 1e-6)
    q64 = q64 * (dk**-0.5 if scale is None else scale)
    q64, k64 = q64.repeat_interleave(hv // hk, dim=1), k64.repeat_interleave(hv // hk, dim=1)
    if g is None:
        alpha = torch.ones(bsz, hv, n, dk, dtype=torch.float64, device=q.device)
    elif g.dim() == 3:
        alpha = g.double().exp().unsqueeze(-1).expand(bsz, hv, n, dk)
    else:
        alpha = g.double().exp()
    state = torch.zeros(bsz, hv, dk, dv, dtype=torch.float64, device=q.device)
    if initial_state is not None:
        state = initial_state.double()
    eye = torch.eye(dk, dtype=torch.float64, device=q.device)
    out = []
    for t in range(n):
        kt, bt = k64[:, :, t], b64[:, :, t, None, None]
        erase = eye - bt * torch.einsum("bhi,bhj->bhij", kt, kt)
        write = bt * torch.einsum("bhi,bhj->bhij", kt, v64[:, :, t])
        state = erase @ (alpha[:, :, t].unsqueeze(-1) * state) + write
        out.append(torch.einsum("bhij,bhi->bhj", state, q64[:, :, t]))
    return torch.stack(out, dim=2), state
