"""The shared kernels of gated linear attention: chunked, recurrent and parallel forms.

One recurrence, three ways to compute it. Per state head h (Hkv of them; a group of
Hq / Hkv query heads reads each state, as in GQA):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        S: (Dk, Dv), S_0 = initial state
    o_t = scale * q_t^T S_t

``g`` is a log-space decay (<= 0): None (no decay), (B, H, N) one scalar per head and
token, or (B, H, N, Dk) one per key channel. Non-causal (no decay only) uses every key:
o_i = scale * q_i^T (S_0 + sum_j k_j v_j^T).

- ``chunk`` (prefill): tokens in chunks of C. Within a chunk the exact quadratic part is
  computed for all chunks and heads at once with matmuls; the state goes from chunk to
  chunk in a loop over chunks (never over tokens), holding one chunk row's state at a
  time. Numerically stable in log space: exponents are differences of cumulative
  log-decays within a chunk, <= 0 for the state (relative to the chunk's end) and the
  inter-chunk read (relative to its start); the intra-chunk part (per-channel decay, and
  per-head decay as its one-channel case) is one rescaled matmul per chunk when its decay
  spans at most SPAN (so no exponent exceeds SPAN); else a per-head decay uses the masked
  (C, C) matrix exp(b_i - b_j), and a per-channel one ``_tree``, which halves blocks
  (exponents <= 0 across the halves) until every block's span is small, so exp never
  sees a large positive number. Memory O(N (C + D)),
  plus one (Dk, Dv) state per head. Under autograd the loop keeps one state per chunk
  for backward (N / C x Dk x Dv per head, O(N D) for C ~ D), never an N x N tensor.
- ``recurrent`` (decode, and a check): the per-token loop above.
- ``parallel`` (small N): the quadratic form with a masked (N, N) decay matrix
  ((N, N, Dk) for per-channel decay).

Every function takes q: (B, Hq, N, Dk), k: (B, H, N, Dk), v: (B, H, N, Dv), state
(B, H, Dk, Dv) or None, in the compute dtype (float32, or float64), and returns
(o (B, Hq, N, Dv), final state (B, H, Dk, Dv)).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

FORMS = ("chunk", "recurrent", "parallel")
ROW_CHUNKS = 16  # chunks per row of the chunked form (16 x 64 tokens: a few MiB of temporaries)
SPAN = 16.0  # largest decay span (in log space) of a block done in one matmul: exp(16) ~ 9e6


def choose_form(form: str, q_len: int) -> str:
    """The form that runs a call: ``form`` unless "auto"; then recurrent for decode
    (Nq == 1), chunk for prefill. The one place a linear method's form is chosen."""
    if form != "auto":
        return form
    return "recurrent" if q_len == 1 else "chunk"


def run_form(form: str, q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], scale: float,
             state: Optional[Tensor], causal: bool = True, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Gated linear attention in ``form`` (see the module docstring for shapes)."""
    if state is None:
        state = q.new_zeros(k.shape[0], k.shape[1], k.shape[-1], v.shape[-1])
    if not causal:
        if g is not None:
            raise ValueError("non-causal linear attention has no decay: g must be None")
        return (parallel_noncausal if form == "parallel" else state_noncausal)(q, k, v, scale, state)
    if form == "chunk":
        return chunk_gla(q, k, v, g, scale, state, chunk_size)
    if form == "recurrent":
        return recurrent_gla(q, k, v, g, scale, state)
    return parallel_gla(q, k, v, g, scale, state)


def _grouped(q: Tensor, heads: int) -> Tensor:
    """(B, Hq, N, D) -> (B, H, G, N, D): query head i reads state head i // G."""
    b, hq, n, d = q.shape
    return q.reshape(b, heads, hq // heads, n, d)


def _ungroup(o: Tensor) -> Tensor:
    """(B, H, G, N, Dv) -> (B, Hq, N, Dv)."""
    b, h, grp, n, dv = o.shape
    return o.reshape(b, h * grp, n, dv)


# --- non-causal: every key, no decay ---------------------------------------------------


def state_noncausal(q: Tensor, k: Tensor, v: Tensor, scale: float, state: Tensor) -> tuple[Tensor, Tensor]:
    """o = scale q (S_0 + K^T V): the state first, O(N D^2)."""
    state = state + k.transpose(-1, -2) @ v
    return _ungroup((_grouped(q, k.shape[1]) * scale) @ state.unsqueeze(2)), state


def parallel_noncausal(q: Tensor, k: Tensor, v: Tensor, scale: float, state: Tensor) -> tuple[Tensor, Tensor]:
    """o = scale (q K^T) V + scale q S_0: the quadratic form."""
    qg = _grouped(q, k.shape[1]) * scale
    o = (qg @ k.unsqueeze(2).transpose(-1, -2)) @ v.unsqueeze(2) + qg @ state.unsqueeze(2)
    return _ungroup(o), state + k.transpose(-1, -2) @ v


# --- recurrent: one token at a time ----------------------------------------------------


def recurrent_gla(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], scale: float,
                  state: Tensor) -> tuple[Tensor, Tensor]:
    """The per-token loop (decode; a check of the other forms)."""
    qg = _grouped(q, k.shape[1]) * scale
    outs = []
    for t in range(q.shape[2]):
        if g is not None:
            decay = g[:, :, t].exp()
            state = state * (decay[..., None] if g.dim() == 4 else decay[..., None, None])
        state = state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(qg[:, :, :, t] @ state)  # (B, H, G, Dv)
    return _ungroup(torch.stack(outs, dim=3)), state


# --- parallel: quadratic, masked decay matrix ------------------------------------------


def parallel_gla(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], scale: float,
                 state: Tensor) -> tuple[Tensor, Tensor]:
    """o_i = scale sum_{j<=i} (q_i * exp(b_i - b_j)) . k_j v_j + scale (q_i * exp(b_i)) S_0,
    b the cumulative log-decay over the whole sequence. Builds (N, N) (per head) or
    (N, N, Dk) (per channel): for small N."""
    n = q.shape[2]
    qg = _grouped(q, k.shape[1]) * scale
    tril = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if g is None:
        scores = (qg @ k.unsqueeze(2).transpose(-1, -2)).masked_fill(~tril, 0.0)
        o = scores @ v.unsqueeze(2) + qg @ state.unsqueeze(2)
        return _ungroup(o), state + k.transpose(-1, -2) @ v
    b = g.cumsum(2)
    last = b[:, :, -1:]
    diff = b[:, :, :, None] - b[:, :, None, :]  # (B, H, N, N[, Dk]) b_i - b_j
    mask = tril if g.dim() == 3 else tril[..., None]
    decay = diff.masked_fill(~mask, float("-inf")).exp()
    if g.dim() == 3:
        scores = (qg @ k.unsqueeze(2).transpose(-1, -2)) * decay.unsqueeze(2)
        q_in, k_st, s_decay = qg * b.exp()[:, :, None, :, None], k * (last - b).exp()[..., None], last.exp()[..., None]
    else:
        scores = torch.einsum("bhgid,bhijd,bhjd->bhgij", qg, decay, k)
        q_in, k_st, s_decay = qg * b.exp().unsqueeze(2), k * (last - b).exp(), last.exp().transpose(-1, -2)
    o = scores @ v.unsqueeze(2) + q_in @ state.unsqueeze(2)
    return _ungroup(o), s_decay * state + k_st.transpose(-1, -2) @ v


# --- chunk: exact within a chunk, the state across chunks ------------------------------


def chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], scale: float, state: Tensor,
              chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """The chunked form (prefill). See the module docstring."""
    bsz, heads, n, _ = k.shape
    c = chunk_size
    nc = -(-n // c)
    pad = nc * c - n
    if pad:  # zero keys add nothing; zero log-decay keeps the state as it is
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g = None if g is None else F.pad(g, (0, 0, 0, pad) if g.dim() == 4 else (0, pad))
    qc = _grouped(q, heads).unflatten(3, (nc, c)).transpose(2, 3)  # (B, H, nc, G, C, Dk)
    kc, vc = k.unflatten(2, (nc, c)), v.unflatten(2, (nc, c))  # (B, H, nc, C, D)
    gc = None if g is None else g.unflatten(2, (nc, c))
    pieces = []
    for start in range(0, nc, ROW_CHUNKS):  # a row of chunks at a time: its temporaries stay in cache
        part = slice(start, start + ROW_CHUNKS)
        o_row, state = _chunk_row(qc[:, :, part] * scale, kc[:, :, part], vc[:, :, part],
                                  None if gc is None else gc[:, :, part], g is not None and g.dim() == 4, state)
        pieces.append(o_row)
    o = torch.cat(pieces, dim=2).transpose(2, 3).flatten(3, 4)  # (B, H, G, nc*C, Dv)
    return _ungroup(o)[:, :, :n], state


def _chunk_row(qc, kc, vc, gc, per_channel, state):
    """One row of chunks: the exact intra-chunk part, then the state carried across them.
    qc: (B, H, m, G, C, Dk) (scaled); kc, vc: (B, H, m, C, D); gc: None, (B, H, m, C) or
    (B, H, m, C, Dk). Returns (o (B, H, m, G, C, Dv), the state after the row)."""
    if gc is None:
        o_intra, q_in, k_st, s_decay = _intra_free(qc, kc, vc)
    else:  # a per-head decay is a per-channel one with one channel, broadcast over Dk
        o_intra, q_in, k_st, s_decay = _intra_decay(qc, kc, vc, gc if per_channel else gc.unsqueeze(-1))
    o_inter, state = _carry(q_in, k_st, vc, s_decay, state)
    return o_intra + o_inter, state


def _carry(q_in, k_st, vc, s_decay, state):
    """The loop over chunks: o_inter[c] = q_in[c] S_{c-1}; S_c = decay_c S_{c-1} + k_st[c]^T v[c].

    q_in: (B, H, nc, G, C, Dk); k_st: (B, H, nc, C, Dk); vc: (B, H, nc, C, Dv);
    s_decay: None or (B, H, nc, 1, 1) / (B, H, nc, Dk, 1). Returns (o_inter
    (B, H, nc, G, C, Dv), final state). Inputs are laid out chunk-major once, so each step
    is two batched matmuls (and a decay) on contiguous slices."""
    bsz, heads, nc, grp, c, dk = q_in.shape
    dv = vc.shape[-1]
    bh = bsz * heads
    qm = q_in.permute(2, 0, 1, 3, 4, 5).reshape(nc, bh, grp * c, dk)
    km = k_st.permute(2, 0, 1, 4, 3).reshape(nc, bh, dk, c)
    vm = vc.permute(2, 0, 1, 3, 4).reshape(nc, bh, c, dv)
    dm = None if s_decay is None else s_decay.permute(2, 0, 1, 3, 4).reshape(nc, bh, -1, 1)
    state = state.reshape(bh, dk, dv)
    outs = []
    for i in range(nc):
        outs.append(torch.bmm(qm[i], state))
        state = torch.baddbmm(state if dm is None else dm[i] * state, km[i], vm[i])
    o = torch.stack(outs).view(nc, bsz, heads, grp, c, dv).permute(1, 2, 0, 3, 4, 5)
    return o, state.view(bsz, heads, dk, dv)


def _intra_free(qc, kc, vc):
    """No decay: causal-masked (C, C) scores. qc: (B, H, nc, G, C, Dk); kc, vc: (B, H, nc, C, D).
    Returns o_intra (B, H, nc, G, C, Dv) and the carry's inputs (q_in, k_st, s_decay)."""
    c = kc.shape[3]
    tril = torch.ones(c, c, dtype=torch.bool, device=kc.device).tril()
    scores = qc @ kc.unsqueeze(3).transpose(-1, -2)  # (B, H, nc, G, C, C)
    return scores.masked_fill(~tril, 0.0) @ vc.unsqueeze(3), qc, kc, None


def _intra_decay(qc, kc, vc, gc):
    """Decay per channel, gc: (B, H, nc, C, Dk), or per head, gc: (B, H, nc, C, 1).
    Returns like ``_intra_free``.

    When no chunk's decay spans more than SPAN (the usual gates), the (C, C) weights
    sum_d q_id k_jd exp(b_id - b_jd) are one masked matmul of q exp(b) (<= 1) and
    k exp(-b) (<= exp(SPAN)), b relative to the chunk's start. Otherwise a per-head decay
    uses the masked (C, C) matrix exp(b_i - b_j), and a per-channel one ``_tree``, which
    halves the blocks where needed (the chunk padded to a power of two: zero q, k, v and
    log-decay 0 add nothing)."""
    bsz, heads, nc, grp, c, dk = qc.shape
    b = gc.cumsum(3)
    last = b[:, :, :, -1:]
    q_in = qc * b.exp().unsqueeze(3)
    s_decay = last.exp().transpose(-1, -2)
    tril = torch.ones(c, c, dtype=torch.bool, device=qc.device).tril()
    if bool(last.min() >= -SPAN):
        k_neg = kc * (-b).exp()
        scores = (q_in @ k_neg.unsqueeze(3).transpose(-1, -2)).masked_fill(~tril, 0.0)
        return scores @ vc.unsqueeze(3), q_in, k_neg * last.exp(), s_decay
    if gc.shape[-1] == 1:  # per head: the (C, C) decay matrix exp(b_i - b_j), j <= i, at any strength
        bh = b.squeeze(-1)
        decay = (bh[..., :, None] - bh[..., None, :]).masked_fill(~tril, float("-inf")).exp()
        scores = (qc @ kc.unsqueeze(3).transpose(-1, -2)) * decay.unsqueeze(3)
        return scores @ vc.unsqueeze(3), q_in, kc * (last - b).exp(), s_decay
    p = 1 << (c - 1).bit_length()
    pad = (0, 0, 0, p - c)
    q_t = F.pad(qc, pad).transpose(2, 3)  # (B, H, G, nc, P, Dk): blocks split by views
    b_pad = torch.cat([b, last.expand(-1, -1, -1, p - c, -1)], dim=3)  # log-decay 0 after the chunk's end
    o = _tree(q_t, F.pad(kc, pad), F.pad(vc, pad), b_pad)
    o = o.transpose(2, 3)[:, :, :, :, :c]  # (B, H, nc, G, C, Dv)
    return o, q_in, kc * (last - b).exp(), s_decay


def _tree(q, k, v, b):
    """Intra-block attention with per-channel decay, halving blocks until each is short.

    q: (B, H, G, nb, T, Dk); k: (B, H, nb, T, Dk); b: (B, H, nb, T, Dk or 1) (cumulative
    log-decay, any offset); v: (B, H, nb, T, Dv); T a power of two. Returns (B, H, G, nb, T, Dv).
    A block whose decay spans at most SPAN (every channel) is done in one masked matmul,
    q and k rescaled to its first token: exp(b_i - b_first) <= 1 and
    exp(b_first - b_j) <= exp(SPAN). Otherwise the block's second half attends to its first
    half with both rescaled to the end of the first half (exponents <= 0), and each half
    is split again (all blocks of a level in one batched step)."""
    bsz, heads, grp, nb, t, dk = q.shape
    out_shape = q.shape[:-1] + (v.shape[-1],)
    o = q.new_zeros(out_shape)
    while t > 1 and bool((b[..., :1, :] - b[..., -1:, :]).max() > SPAN):
        h = t // 2
        ref = b[..., h - 1:h, :]  # (B, H, nb, 1, Dk): end of the first half
        q2 = q[..., h:, :] * (b[..., h:, :] - ref).exp().unsqueeze(2)
        k1 = k[..., :h, :] * (ref - b[..., :h, :]).exp()
        cross = (q2 @ k1.unsqueeze(2).transpose(-1, -2)) @ v[..., :h, :].unsqueeze(2)  # (B, H, G, nb, h, Dv)
        o = o + F.pad(cross, (0, 0, h, 0))
        nb, t = nb * 2, h
        q, o = q.reshape(bsz, heads, grp, nb, t, dk), o.reshape(bsz, heads, grp, nb, t, -1)
        k, v, b = (x.reshape(bsz, heads, nb, t, x.shape[-1]) for x in (k, v, b))
    first = b[..., :1, :]
    scores = (q * (b - first).exp().unsqueeze(2)) @ (k * (first - b).exp()).unsqueeze(2).transpose(-1, -2)
    tril = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    o = o + scores.masked_fill(~tril, 0.0) @ v.unsqueeze(2)
    return o.reshape(out_shape)
