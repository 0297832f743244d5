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


# =====================================================================================
# Linear family: per-token recurrences
# =====================================================================================
#
# The definition of each linear method, in float64, one token at a time (nothing here is
# fast). Feature-map and decay methods (linear, retnet, lightning, gla) share one
# recurrence per state head h (the Hkv key/value heads; query head i reads head i // G):
#
#     S_t = diag(exp(g_t)) S_{t-1} + phi(k_t) v_t^T        z_t = diag(exp(g_t)) z_{t-1} + phi(k_t)
#     o_t = scale phi(q_t)^T S_t    [ / (scale phi(q_t)^T z_t + eps) when normalised ]
#
# Non-causal (no decay) is the same with every key: o_t = scale phi(q_t)^T S_N.

_FEATURE_MAPS = {
    "identity": lambda x: x,
    "relu": torch.relu,
    "elu1": lambda x: torch.where(x > 0, x + 1.0, torch.exp(x)),  # elu(x) + 1
}


def linear_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    causal: bool = True,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    initial_z: torch.Tensor | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    feature_map: str = "identity",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The per-token recurrence of gated / feature-map linear attention, in float64.

    q: (B, Hq, N, Dk); k: (B, H, N, Dk); v: (B, H, N, Dv) with Hq % H == 0; g: log-decay,
    None, (B, H, N) or (B, H, N, Dk) (causal only); initial_state: (B, H, Dk, Dv);
    initial_z: (B, H, Dk) (normalised only). Returns (out (B, Hq, N, Dv), S (B, H, Dk, Dv),
    z (B, H, Dk) or None), all float64. Differentiable.
    """
    if g is not None and not causal:
        raise ValueError("linear_recurrence: a decay g is defined for causal attention only")
    phi = _FEATURE_MAPS[feature_map]
    q64, k64, v64 = phi(q.double()), phi(k.double()), v.double()
    b, hq, n, dk = q64.shape
    heads, dv = k64.shape[1], v64.shape[-1]
    group = hq // heads
    S = torch.zeros(b, heads, dk, dv, dtype=torch.float64) if initial_state is None else initial_state.double()
    z = None
    if normalize:
        z = torch.zeros(b, heads, dk, dtype=torch.float64) if initial_z is None else initial_z.double()
    if not causal:
        S = S + torch.einsum("bhnd,bhne->bhde", k64, v64)
        z = None if z is None else z + k64.sum(2)
    rows = []
    for t in range(n):
        if causal:
            if g is not None:
                decay = g[:, :, t].double().exp()
                decay = decay if g.dim() == 4 else decay[..., None].expand(b, heads, dk)  # (B, H, Dk)
                S = decay.unsqueeze(-1) * S
                z = None if z is None else decay * z
            S = S + k64[:, :, t, :, None] * v64[:, :, t, None, :]
            z = None if z is None else z + k64[:, :, t]
        row = []
        for i in range(hq):  # query head i reads state head i // group
            qt = scale * q64[:, i, t]  # (B, Dk)
            o = torch.einsum("bd,bde->be", qt, S[:, i // group])
            if z is not None:
                o = o / ((qt * z[:, i // group]).sum(-1, keepdim=True) + eps)
            row.append(o)
        rows.append(torch.stack(row, dim=1))
    return torch.stack(rows, dim=2), S, z


# === Sigmoid and agent attention: dense formulas ======================================
# The definitions of the linear family's two quadratic methods (attnkit.methods.linear
# .sigmoid / .agent), dense in float64: the full Nq x Nk matrix, on purpose.


def sigmoid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    bias: float | None = None,
    window: int = 0,
) -> torch.Tensor:
    """sum_j sigmoid(scale q_i . k_j + bias) v_j over the allowed keys, in float64.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv); query row i at position
    Nk - Nq + i. Allowed: every key; causal: j <= i; window W > 0: i - j < W (causal) or
    |i - j| < W. bias None: -log(Nk). Returns (B, Hq, Nq, Dv) float64; differentiable.
    """
    nq, nk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    bias = -math.log(nk) if bias is None else bias
    weights = torch.sigmoid(torch.matmul(q.double(), k64.transpose(-1, -2)) * scale + bias)
    dist = (torch.arange(nq)[:, None] + nk - nq) - torch.arange(nk)[None, :]
    allowed = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        allowed &= dist >= 0
    if window > 0:
        allowed &= (dist < window) & (dist > -window)
    return torch.matmul(weights * allowed.to(q.device), v64)


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: int,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(scale Q A^T) softmax(scale A K^T) V in float64 (non-causal).

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv). The agents A (B, Hq, n, D)
    are the mean of the queries over n segments of the sequence: agent a averages rows
    floor(a Nq / n) .. ceil((a + 1) Nq / n) - 1 (adaptive average pooling). Returns
    (B, Hq, Nq, Dv) float64; differentiable.
    """
    nq = q.shape[2]
    group = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q64 = q.double()
    rows = [q64[:, :, (a * nq) // agents: -((-(a + 1) * nq) // agents)].mean(dim=2) for a in range(agents)]
    a64 = torch.stack(rows, dim=2)
    agent_v = torch.softmax(torch.matmul(a64, k64.transpose(-1, -2)) * scale, dim=-1) @ v64
    return torch.softmax(torch.matmul(q64, a64.transpose(-1, -2)) * scale, dim=-1) @ agent_v


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
