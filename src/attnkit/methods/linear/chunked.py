"""The shared kernels of gated linear attention: chunked, recurrent and parallel forms.

One recurrence, three ways to compute it. Per state head h (Hkv of them; a group of
Hq / Hkv query heads reads each state, as in GQA):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        S: (Dk, Dv), S_0 = initial state
    o_t = scale * q_t^T S_t

``g`` is a log-space decay (<= 0): None (no decay), (B, H, N) one scalar per head and
token, or (B, H, N, Dk) one per key channel. Non-causal (no decay only) uses every key:
o_i = scale * q_i^T (S_0 + sum_j k_j v_j^T).

- ``chunk`` (prefill): tokens in chunks of C, processed a row of ROW_CHUNKS chunks at a
  time (its temporaries stay in cache). Within a chunk the exact quadratic part is one
  batched matmul for the row's chunks and heads; the state crosses the row's chunks
  (never token by token): where every chunk decays it alike (no decay, or a decay that is
  one constant per head: retnet, lightning) the states before each chunk are one matmul
  over the row's chunks, and the constant decay's (C, C) matrix is computed once per
  call (every exponent <= 0); a data-dependent decay carries the state chunk by chunk.
  Numerically stable in log space: exponents are differences of cumulative
  log-decays within a chunk, <= 0 for the state (relative to the chunk's end) and the
  inter-chunk read (relative to its start); the intra-chunk part (per-channel decay, and
  per-head decay as its one-channel case) is one rescaled matmul per chunk when its decay
  spans at most SPAN (so no exponent exceeds SPAN); else a per-head decay uses the masked
  (C, C) matrix exp(b_i - b_j), and a per-channel one ``_tree``, which halves blocks
  (exponents <= 0 across the halves) until every block's span is small, so exp never
  sees a large positive number. A feature map (``feature``) and the normaliser's
  division (``eps``) are applied a row at a time too. Memory O(N (C + D)),
  plus the states of one row. Under autograd the rows keep one state per chunk
  for backward (N / C x Dk x Dv per head, O(N D) for C ~ D), never an N x N tensor.
- ``recurrent`` (decode, and a check): the per-token loop above.
- ``parallel`` (small N): the quadratic form with a masked (N, N) decay matrix
  ((N, N, Dk) for per-channel decay).

Every function takes q: (B, Hq, N, Dk), k: (B, H, N, Dk), v: (B, H, N, Dv), state
(B, H, Dk, Dv) or None, in the compute dtype (float32, or float64), and returns
(o (B, Hq, N, Dv), final state (B, H, Dk, Dv)).
"""

from __future__ import annotations

from typing import Callable, Optional

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
             state: Optional[Tensor], causal: bool = True, chunk_size: int = 64,
             feature: Optional[Callable[[Tensor], Tensor]] = None, eps: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Gated linear attention in ``form`` (see the module docstring for shapes).

    ``feature``: a feature map applied to q and k first (the chunked form applies it a
    row of chunks at a time, where the row is in cache). ``eps``: normalise,
    o = num / (den + eps), the denominator carried as one more value column of ones:
    ``state`` is then (B, H, Dk, Dv + 1) (the normaliser z in the last column, as the
    returned state) and the output (B, Hq, N, Dv)."""
    if state is None:
        features = k.shape[-1] if feature is None else feature(k[..., :1, :]).shape[-1]
        state = q.new_zeros(k.shape[0], k.shape[1], features, v.shape[-1] + (eps is not None))
    if causal and form == "chunk":
        return chunk_gla(q, k, v, g, scale, state, chunk_size, feature, eps)
    if feature is not None:
        q, k = feature(q), feature(k)
    if eps is not None:
        v = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)
    if not causal:
        if g is not None:
            raise ValueError("non-causal linear attention has no decay: g must be None")
        out, state = (parallel_noncausal if form == "parallel" else state_noncausal)(q, k, v, scale, state)
    elif form == "recurrent":
        out, state = recurrent_gla(q, k, v, g, scale, state)
    else:
        out, state = parallel_gla(q, k, v, g, scale, state)
    return (out if eps is None else _divide(out, eps)), state


def _divide(o: Tensor, eps: float) -> Tensor:
    """(..., Dv + 1) numerator and denominator -> (..., Dv) numerator / (denominator + eps)."""
    return o[..., :-1] / (o[..., -1:] + eps)


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
              chunk_size: int = 64, feature: Optional[Callable[[Tensor], Tensor]] = None,
              eps: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """The chunked form (prefill); ``feature`` and ``eps`` as in ``run_form``. See the
    module docstring."""
    bsz, heads, n, _ = k.shape
    c = chunk_size
    nc = -(-n // c)
    pad = nc * c - n
    # a decay that is one constant per head (retnet, lightning): its (C, C) matrix once
    const = None
    if g is not None and g.dim() == 3 and n and bool((g == g[..., :1]).all()):
        const = _constant_decay(g[..., 0], c, scale)
    if pad:  # zero keys add nothing; zero log-decay keeps the state as it is
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g = None if g is None else F.pad(g, (0, 0, 0, pad) if g.dim() == 4 else (0, pad))
    if q.shape[1] == heads:  # G = 1: a plain unsqueeze (a size-1 dim with a large stride slows every op)
        qc = q.unflatten(2, (nc, c)).unsqueeze(3)  # (B, H, nc, G, C, Dk)
    else:
        qc = _grouped(q, heads).unflatten(3, (nc, c)).transpose(2, 3)
    kc, vc = k.unflatten(2, (nc, c)), v.unflatten(2, (nc, c))  # (B, H, nc, C, D)
    gc = None if g is None else g.unflatten(2, (nc, c))
    pieces = []
    for start in range(0, nc, ROW_CHUNKS):  # a row of chunks at a time: its temporaries stay in cache
        part = slice(start, start + ROW_CHUNKS)
        q_row, k_row, v_row = qc[:, :, part], kc[:, :, part], vc[:, :, part]
        # row-contiguous k, v (one copy, not one per matmul); the feature map makes them so
        k_row = k_row.contiguous() if feature is None else feature(k_row)
        q_row = q_row if feature is None else feature(q_row)
        if eps is None:
            v_row = v_row.contiguous()
        else:  # the normaliser's column: ones on real tokens, zeros on padding
            v_row = _with_ones(v_row, c - pad if pad and start + ROW_CHUNKS >= nc else c)
        if const is not None and not (pad and start + ROW_CHUNKS >= nc):
            o_row, state = _row_constant(q_row, k_row, v_row, const, state)
        elif g is None:
            o_row, state = _row_free(q_row if scale == 1.0 else q_row * scale, k_row, v_row, state)
        else:  # the padded last row of a constant decay too: the state is not decayed past the end
            g_row = gc[:, :, part]
            o_row, state = _row_decay(q_row * scale, k_row, v_row, g_row if g.dim() == 4 else g_row.unsqueeze(-1),
                                      state)
        pieces.append(o_row if eps is None else _divide(o_row, eps))
    o = torch.cat(pieces, dim=2).transpose(2, 3).flatten(3, 4)  # (B, H, G, nc*C, Dv)
    return _ungroup(o)[:, :, :n], state


def _with_ones(v_row: Tensor, real: int) -> Tensor:
    """(B, H, m, C, Dv) -> (B, H, m, C, Dv + 1): a last column of ones, zero past the first
    ``real`` tokens of the last chunk (padding)."""
    out = v_row.new_empty(v_row.shape[:-1] + (v_row.shape[-1] + 1,))
    out[..., :-1] = v_row
    out[..., -1] = 1.0
    if real < v_row.shape[3]:
        out[:, :, -1, real:, -1] = 0.0
    return out


def _constant_decay(g: Tensor, c: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A log-decay g (B, H) per head, the same at every token: the chunk's (C, C) decay
    matrix scale exp(g (i - j)) (j <= i, else 0), the rescalings of q (scale exp(g (i + 1)),
    (B, H, 1, 1, C, 1)) and k (exp(g (C - 1 - i)), (B, H, 1, C, 1)), and the state's
    log-decay per chunk g C (B, H). Every exponent is <= 0: any decay strength is exact (a
    contribution below the dtype's range is 0, its limit)."""
    i = torch.arange(c, dtype=g.dtype, device=g.device)
    gh = g[:, :, None]
    dmat = ((gh[..., None] * (i[:, None] - i[None, :]).clamp(min=0)).exp() * scale).tril()  # (B, H, C, C)
    q_scale = (gh * (i + 1)).exp() * scale
    k_scale = (gh * (c - 1 - i)).exp()
    return dmat[:, :, None, None], q_scale[:, :, None, None, :, None], k_scale[:, :, None, :, None], g * c


def _scores(qc: Tensor, kc: Tensor) -> Tensor:
    """qc: (B, H, m, G, C, Dk), kc: (B, H, m, C, Dk) -> q k^T (B, H, m, G, C, C), the G query
    heads of a state head in one matmul (no broadcast copy of k)."""
    b, h, m, grp, c, dk = qc.shape
    return (qc.reshape(b, h, m, grp * c, dk) @ kc.transpose(-1, -2)).view(b, h, m, grp, c, kc.shape[3])


def _apply(scores: Tensor, vc: Tensor) -> Tensor:
    """scores (B, H, m, G, C, C) @ vc (B, H, m, C, Dv) -> (B, H, m, G, C, Dv)."""
    b, h, m, grp, c, _ = scores.shape
    return (scores.view(b, h, m, grp * c, -1) @ vc).view(b, h, m, grp, c, vc.shape[-1])


def _row_constant(qc, kc, vc, const, state):
    """A row under a constant per-head decay (``_constant_decay``'s tensors, scale folded
    in). qc: (B, H, m, G, C, Dk) unscaled; kc, vc: (B, H, m, C, D). Returns (o, state)."""
    dmat, q_scale, k_scale, log_s = const
    o_intra = _apply(_scores(qc, kc) * dmat, vc)
    kc = kc * k_scale
    s_prev, state = _states_uniform(kc.transpose(-1, -2) @ vc, log_s, state)
    return _read(o_intra, qc * q_scale, s_prev), state


def _row_free(qc, kc, vc, state):
    """A row without decay: causal-masked (C, C) scores. qc: (B, H, m, G, C, Dk) scaled;
    kc, vc: (B, H, m, C, D). Returns (o (B, H, m, G, C, Dv), state)."""
    o_intra = _apply(_scores(qc, kc).tril_(), vc)
    s_prev, state = _states_uniform(kc.transpose(-1, -2) @ vc, None, state)
    return _read(o_intra, qc, s_prev), state


def _row_decay(qc, kc, vc, gc, state):
    """A row with a data-dependent decay gc (B, H, m, C, Dk) per channel or (B, H, m, C, 1)
    per head: ``_intra_decay``, then the state carried chunk by chunk."""
    o_intra, q_in, k_st, s_decay = _intra_decay(qc, kc, vc, gc)
    kv = k_st.transpose(-1, -2) @ vc  # (B, H, m, Dk, Dv)
    before = []
    for kv_i, decay_i in zip(kv.unbind(2), s_decay.unbind(2)):  # unbound once: one backward node
        before.append(state)
        state = kv_i + decay_i * state
    return _read(o_intra, q_in, torch.stack(before, dim=2)), state


def _states_uniform(kv: Tensor, log_s: Optional[Tensor], state: Tensor) -> tuple[Tensor, Tensor]:
    """The states before each chunk of a row, every chunk decaying the state by the same
    exp(log_s) per head (None: no decay), as one matmul over the row's chunks:
    S_before[c] = d^c S_0 + sum_{c' < c} d^(c - 1 - c') kv[c'] (exponents >= 0, d <= 1).
    kv: (B, H, m, Dk, Dv) the chunks' k^T v; log_s: (B, H) or None; state (B, H, Dk, Dv).
    Returns (S_before (B, H, m, Dk, Dv), the state after the row)."""
    b, h, m, dk, dv = kv.shape
    c = torch.arange(m + 1, dtype=kv.dtype, device=kv.device)
    lag = c[:, None] - 1 - c[None, :m]  # (m + 1, m): c - 1 - c', >= 0 where chunk c' is before c
    if log_s is None:
        weights, powers = (lag >= 0).to(kv.dtype), torch.ones_like(c)[:, None, None]
    else:
        ls = log_s[:, :, None, None]
        weights = (ls * lag.clamp(min=0)).exp().masked_fill(lag < 0, 0.0)  # (B, H, m + 1, m)
        powers = (ls[..., 0] * c).exp()[..., None, None]  # (B, H, m + 1, 1, 1)
    flat = kv.reshape(b, h, m, dk * dv)
    s_prev = (weights[..., :m, :] @ flat).view(b, h, m, dk, dv).addcmul_(powers[..., :m, :, :], state[:, :, None])
    final = (weights[..., m:, :] @ flat).view(b, h, dk, dv).addcmul_(powers[..., m, :, :], state)
    return s_prev, final


def _read(o_intra: Tensor, q_in: Tensor, s_prev: Tensor) -> Tensor:
    """o_intra + q_in S_before per chunk, fused in one batched matmul. o_intra:
    (B, H, m, G, C, Dv); q_in: (B, H, m, G, C, Dk); s_prev: (B, H, m, Dk, Dv)."""
    b, h, m, grp, c, dv = o_intra.shape
    dk = q_in.shape[-1]
    q_in, s_prev = q_in.reshape(-1, grp * c, dk), s_prev.reshape(-1, dk, dv)
    if not o_intra.is_contiguous():  # (the block-halving path's layout)
        return torch.baddbmm(o_intra.reshape(-1, grp * c, dv), q_in, s_prev).view(o_intra.shape)
    o_intra.view(-1, grp * c, dv).baddbmm_(q_in, s_prev)
    return o_intra


def _intra_decay(qc, kc, vc, gc):
    """Decay per channel, gc: (B, H, nc, C, Dk), or per head, gc: (B, H, nc, C, 1).
    Returns (o_intra (B, H, m, G, C, Dv), q_in, k_st, s_decay (B, H, m, Dk | 1, 1)).

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
