"""Delta-rule family as pure functions: DeltaNet, Gated DeltaNet and Kimi Delta Attention.

Papers:
- ``delta``: Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the
  Delta Rule over Sequence Length", arXiv:2406.06484 (2024).
- ``gated_delta``: Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2
  with Delta Rule", arXiv:2412.06464 (2024).
- ``kda``: Kimi Team, "Kimi Linear: An Expressive, Efficient Attention Architecture",
  arXiv:2510.26692 (2025).

Recurrence, per value head, with a (Dk, Dv) state S:

    S <- diag(exp(g_t)) S                        decay: g_t log-space, <= 0
    S <- S + k_t (beta_t (v_t - S^T k_t))^T      delta rule: write the prediction error
    o_t = S^T q_t

``g`` is one scalar per head and token for gated delta (B, Hv, N), one per key channel
for KDA (B, Hv, N, Dk), and 0 for DeltaNet. Before the recurrence q and k are
L2-normalised when ``use_qk_l2norm`` (x * rsqrt(sum x^2 + 1e-6), in the compute dtype)
and q is multiplied by ``scale`` (default Dk^-0.5). These are the semantics of
transformers' ``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule``
(Qwen3-Next) and ``chunk_kimi_delta_attention`` / ``recurrent_kimi_delta_attention``
(Kimi-Linear), in attnkit's layout: q, k (B, Hk, N, Dk), v (B, Hv, N, Dv) with Hv a
multiple of Hk (value head h reads key head h // (Hv / Hk), as transformers'
``repeat_interleave``), beta (B, Hv, N). Computation is in float32 (float64 for
float64 inputs); the output has the input dtype, the state (B, Hv, Dk, Dv) the compute
dtype. The float64 oracle is ``attnkit.reference.reference_delta_rule``.

Chunked form (the WY / UT transform of the DeltaNet and Gated DeltaNet papers): with
gamma the cumulative log-decay inside a chunk of C tokens (from the chunk start), the
writes of a chunk, v_new = beta (v - S_before^T k), solve the unit lower-triangular system
(I + A) V_new = diag(beta) (V - (K * exp(gamma)) S0), A[i, j] = beta_i k_i^T
diag(exp(gamma_i - gamma_j)) k_j (j < i). Batched over every chunk and head: the
intra-chunk scores (q_i or k_i against k_j, decayed), and T = (I + A)^-1 by one batched
``torch.linalg.solve_triangular`` against I (with diag(beta) folded into T's columns).
The only loop runs over chunks and carries the state S0 (B*Hv, Dk, Dv); per chunk it does
five bmm over all heads: q S0 and k S0 (the reads), V_new = T diag(beta) (V - k S0),
out = q S0 + A_qk V_new, S0 <- exp(gamma_C) S0 + K_end^T V_new. Applying T inside the
loop (rather than precomputing T V and T K batched, as transformers does) costs a few
more flops but no full-size temporaries, which dominate on CPU. Memory: O(N D + N C)
plus one state per head; no chunk's state is kept. Gradients: autograd through these ops.

For a per-head decay, exp(gamma) and the l2norm / scale of q and k are never applied
to q and k themselves (full-size passes): they are row factors of the small per-chunk
products in the loop and of the (C, C) intra-chunk scores (the key norm as a term of
their exponent).

Numerics: decays are only ever exponentiated as exp(x) with x <= 0 (relative
differences inside a chunk; plus log of the key's l2norm factor, <= log 1000), so
nothing overflows whatever the decay; the cumulative sums are taken in float64 and
their pairwise differences formed from a hi/lo float32 split, so that small differences
of large sums keep their precision (a float32 cumsum, as in transformers, loses it when
strong decays precede weak ones). For the
per-channel decay of KDA, the pairwise decays are never materialised as a (C, C, Dk)
tensor (as transformers does): the intra-chunk scores are assembled by halving — at
each level a block's lower-left quarter is one matmul of q or k scaled by
exp(gamma_i - gamma_ref) with k scaled by exp(gamma_ref - gamma_j), gamma_ref the
cumulative decay at the block's midpoint (both exponents <= 0).

Deviations from transformers: for KDA ``chunk_size`` must be a power of two (the
halving); KDA accepts grouped heads (Hv = m Hk) like gated delta, where transformers'
Kimi fallback has none; ``scale`` may be set; l2norm uses Qwen's ``x * rsqrt(.)`` also
for KDA (Kimi writes ``x / sqrt(.)``, equal up to rounding); the decay's cumulative sum
is float64 (transformers: float32).
"""

from __future__ import annotations

import torch

_L2_EPS = 1e-6

__all__ = [
    "delta_rule_chunk",
    "delta_rule_recurrent",
    "gated_delta_rule_chunk",
    "gated_delta_rule_recurrent",
    "kda_chunk",
    "kda_recurrent",
]


# --- input preparation -------------------------------------------------------------


def _check(q, k, v, g, beta, initial_state, per_channel: bool | None) -> None:
    """ValueError naming the bad argument; per_channel None means g must be None."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, Hk, N, Dk); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    b, hk, n, dk = q.shape
    if v.dim() != 4 or v.shape[0] != b or v.shape[2] != n or v.shape[1] % hk:
        raise ValueError(f"v must be (B, Hv, N, Dv) with Hv a multiple of Hk={hk}; got {tuple(v.shape)}")
    hv, dv = v.shape[1], v.shape[3]
    if beta.shape != (b, hv, n):
        raise ValueError(f"beta must be (B, Hv, N) = {(b, hv, n)}; got {tuple(beta.shape)}")
    if per_channel is not None:
        want = (b, hv, n, dk) if per_channel else (b, hv, n)
        if g is None or g.shape != want:
            raise ValueError(f"g must be {want}; got {None if g is None else tuple(g.shape)}")
    if initial_state is not None and initial_state.shape != (b, hv, dk, dv):
        raise ValueError(f"initial_state must be (B, Hv, Dk, Dv) = {(b, hv, dk, dv)}; got {tuple(initial_state.shape)}")


def _l2norm_factor(x: torch.Tensor) -> torch.Tensor:
    """(..., 1): rsqrt(sum x^2 + 1e-6) along the last dim (fla's and transformers' l2norm)."""
    return torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() + _L2_EPS)


def _prepare(q, k, v, g, beta, initial_state, scale, use_qk_l2norm):
    """Cast to the compute dtype and repeat q, k to Hv heads; normalisation as row factors.

    Returns q, k (B, Hv, N, Dk) as given, v (B, Hv, N, Dv), g (B, Hv, N[, Dk]) (zeros
    when None), beta (B, Hv, N), the state (B, Hv, Dk, Dv), all in the compute dtype, and
    the row factors rq (B, Hv, N, 1) (l2norm and scale of q) and rk (B, Hv, N, 1), or
    None without l2norm: the normalised inputs are q * rq and k * rk. Kept apart so that
    the chunked form can fold them into small products instead of rewriting q and k.
    """
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, hk, n, dk = q.shape
    hv, dv = v.shape[1], v.shape[3]
    q, k, v, beta = (x.to(dt) for x in (q, k, v, beta))
    g = torch.zeros(b, hv, n, dtype=dt, device=q.device) if g is None else g.to(dt)
    scale = dk**-0.5 if scale is None else scale
    if use_qk_l2norm:
        rq, rk = _l2norm_factor(q) * scale, _l2norm_factor(k)
    else:
        rq, rk = torch.full_like(q[..., :1], scale), None
    if hv != hk:
        q, k, rq = (x.repeat_interleave(hv // hk, dim=1) for x in (q, k, rq))
        rk = None if rk is None else rk.repeat_interleave(hv // hk, dim=1)
    if initial_state is None:
        state = torch.zeros(b, hv, dk, dv, dtype=dt, device=q.device)
    else:
        state = initial_state.to(dt)
    return q, k, v, g, beta, state, rq, rk


# --- blocked helpers ---------------------------------------------------------------


def _merge(d11: torch.Tensor, d21: torch.Tensor, d22: torch.Tensor) -> torch.Tensor:
    """Lower block-triangular [[d11, 0], [d21, d22]]: (..., M, s, s) x3 -> (..., M, 2s, 2s)."""
    top = torch.cat([d11, torch.zeros_like(d11)], dim=-1)
    return torch.cat([top, torch.cat([d21, d22], dim=-1)], dim=-2)


def _unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """(I + tril(a, -1))^-1 for a (..., C, C); the diagonal and upper part of a are unused.

    One batched triangular solve against I: on CPU this beats both a blocked inversion in
    matmuls and solving against the (C, Dk + Dv) right-hand sides.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    return torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)


# --- intra-chunk scores ------------------------------------------------------------


def _outer_diff(row: torch.Tensor, col: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., C) x2 float64 -> (..., C, C) row_i - col_j in ``dtype``, to float64 accuracy.

    Each float64 value is split into hi + lo in ``dtype``: hi_i - hi_j is exact when the
    two are close (Sterbenz) and the lo terms carry the rest; half the cost of a float64
    outer difference followed by a cast.
    """
    if dtype == torch.float64:
        return row.unsqueeze(-1) - col.unsqueeze(-2)
    row_hi, col_hi = row.to(dtype), col.to(dtype)
    row_lo, col_lo = (row - row_hi.double()).to(dtype), (col - col_hi.double()).to(dtype)
    diff = row_hi.unsqueeze(-1) - col_hi.unsqueeze(-2)
    return diff.add_(row_lo.unsqueeze(-1)).sub_(col_lo.unsqueeze(-2))


def _intra_scalar(q, k, gc, rq, rk, beta):
    """Per-head decay. q, k (..., C, Dk) unnormalised, gc (..., C) cumulative log-decay
    (float64), rq, rk, beta (..., C, 1) row factors of q, k and the write strength.

    Returns a_qk[i, j] = rq_i q_i . rk_j k_j exp(gc_i - gc_j) for j <= i, else 0, and
    a_kk[i, j] = beta_i (rk_i k_i . rk_j k_j) exp(gc_i - gc_j) (only j < i is used), both
    (..., C, C). rk_j goes into the exponent (log rk_j <= log 1000), saving a pass.
    """
    c = gc.shape[-1]
    upper = torch.ones(c, c, dtype=torch.bool, device=gc.device).triu(1)
    col = gc if rk is None else gc - rk[..., 0].log()
    decay = _outer_diff(gc, col, q.dtype).masked_fill_(upper, float("-inf")).exp_()
    kt = k.transpose(-1, -2)
    a_kk = torch.matmul(k, kt).mul_(decay).mul_(beta if rk is None else beta * rk)
    return torch.matmul(q, kt).mul_(decay).mul_(rq), a_kk


def _intra_channel(q, k, gc):
    """Per-channel decay. q, k, gc (..., C, Dk), C a power of two.

    Returns (q_i^T diag(exp(gc_i - gc_j)) k_j for j <= i, else 0) and the same with k_i
    for q_i strictly below the diagonal, both (..., C, C). Assembled by halving; every
    exponent is <= 0 (relative to the midpoint of the block pair).
    """
    c = gc.shape[-2]
    bq = (q * k).sum(-1)[..., None, None]  # (..., C, 1, 1): the diagonal, decay exp(0)
    bk = torch.zeros_like(bq)
    s = 1
    while s < c:
        m = c // (2 * s)
        gv, qv, kv = (x.unflatten(-2, (m, 2, s)) for x in (gc, q, k))  # (..., M, 2, s, Dk)
        ref = gv[..., 0, s - 1 : s, :]
        k_first = kv[..., 0, :, :] * (ref - gv[..., 0, :, :]).to(q.dtype).exp()
        e_second = (gv[..., 1, :, :] - ref).to(q.dtype).exp()
        k_first_t = k_first.transpose(-1, -2)
        oq = torch.matmul(qv[..., 1, :, :] * e_second, k_first_t)
        ok = torch.matmul(kv[..., 1, :, :] * e_second, k_first_t)
        bq = _merge(bq[..., 0::2, :, :], oq, bq[..., 1::2, :, :])
        bk = _merge(bk[..., 0::2, :, :], ok, bk[..., 1::2, :, :])
        s *= 2
    return bq[..., 0, :, :], bk[..., 0, :, :]


# --- the two forms -----------------------------------------------------------------


def _scan(q, k, v, t_beta, a_qk, k_write, decay, state, q_row=None, k_row=None, w_row=None):
    """The loop over chunks: the only sequential part, a few bmm over heads per chunk.

    q, k (BH, nc, C, Dk) read the state; v (BH, nc, C, Dv); t_beta (BH, nc, C, C) =
    T diag(beta); a_qk (BH, nc, C, C) the intra-chunk scores; k_write (BH, nc, C, Dk)
    the keys writing the state; decay (BH, nc, 1|Dk, 1) the decay of a whole chunk;
    state (BH, Dk, Dv). A per-channel decay is already in q, k (times exp(gamma), the
    decay from the chunk start) and k_write (times exp(gamma_last - gamma)); a per-head
    decay and the l2norm come as row factors (BH, nc, C, 1) of the small per-chunk
    products instead (in cache): q_row on q S, k_row on k S, w_row on the writes.
    Per chunk: v_new = T diag(beta) (v - k S), out = q S + a_qk v_new,
    S <- decay * S + k_write^T v_new. Returns out (BH, nc, C, Dv) and the final state.
    The inputs are unbound into per-chunk views once (one backward node each, not one
    per chunk that would zero-fill a whole-sequence gradient: quadratic in the chunk
    count) and the outputs stacked once; in-place updates act only on fresh products
    (autograd saves what it needs).
    """
    q, k, v, t_beta, a_qk, k_write, decay = (x.unbind(1) for x in (q, k, v, t_beta, a_qk, k_write, decay))
    q_row, k_row, w_row = (None if x is None else x.unbind(1) for x in (q_row, k_row, w_row))
    outs = []
    for i in range(len(v)):
        q_s, k_s = torch.bmm(q[i], state), torch.bmm(k[i], state)
        if q_row is not None:
            q_s = q_s.mul_(q_row[i])
        k_s = k_s if k_row is None else k_s.mul_(k_row[i])
        v_new = torch.bmm(t_beta[i], v[i] - k_s)
        outs.append(q_s.baddbmm_(a_qk[i], v_new))
        write = v_new if w_row is None else v_new * w_row[i]
        state = (state * decay[i]).baddbmm_(k_write[i].transpose(-1, -2), write)
    return torch.stack(outs, dim=1), state


def _chunk(q, k, v, g, beta, initial_state, scale, use_qk_l2norm, chunk_size):
    """Chunked delta rule; g (B, Hv, N) per head or (B, Hv, N, Dk) per channel."""
    per_channel = g is not None and g.dim() == 4
    if chunk_size < 1 or (per_channel and chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size must be a positive integer, a power of two for kda; got {chunk_size}")
    in_dtype = v.dtype
    b, hv, n, dv = v.shape
    q, k, v, g, beta, state, rq, rk = _prepare(q, k, v, g, beta, initial_state, scale, use_qk_l2norm)
    if per_channel:  # the per-channel decays scale q and k anyway: normalise them now
        q, k, rq, rk = q * rq, (k if rk is None else k * rk), None, None
    dk = q.shape[-1]
    c = chunk_size
    pad = (-n) % c
    nc = (n + pad) // c

    def chunks(x: torch.Tensor | None, value: float = 0.0) -> torch.Tensor | None:
        """(B, Hv, N, d) -> (B*Hv, nc, C, d), padded with ``value``."""
        if x is None:
            return None
        x = torch.nn.functional.pad(x, (0, 0, 0, pad), value=value) if pad else x
        return x.reshape(b * hv, nc, c, x.shape[-1])

    # padded tokens: k = 0 and beta = 0 (no write), g = 0 (no decay): the state is unchanged;
    # row factors padded with 1 (their logs are taken)
    q, k, v = chunks(q), chunks(k), chunks(v)
    rq, rk = chunks(rq, 1.0), chunks(rk, 1.0)
    beta = chunks(beta.unsqueeze(-1))  # (BH, nc, C, 1)
    # cumulative log-decay in float64: differences of large sums keep their precision
    gc = chunks(g if per_channel else g.unsqueeze(-1)).cumsum(dim=2, dtype=torch.float64)  # (BH, nc, C, 1|Dk)
    if per_channel:
        a_qk, a_kk = _intra_channel(q, k, gc)
        a_kk = a_kk.mul_(beta)
    else:
        a_qk, a_kk = _intra_scalar(q, k, gc[..., 0], rq, rk, beta)
    # beta scales the rows of V: folded into T's columns (C x C, cheaper)
    t_beta = _unit_lower_inverse(a_kk) * beta.transpose(-1, -2)
    eg = gc.to(q.dtype).exp()  # decay from the chunk start
    last = gc[:, :, -1:, :]
    f = (last - gc).to(q.dtype).exp()  # decay to the chunk end
    decay = last.to(q.dtype).exp().transpose(-1, -2)  # (BH, nc, 1|Dk, 1)
    s0 = state.reshape(b * hv, dk, dv)
    if per_channel:
        out, state = _scan(q * eg, k * eg, v, t_beta, a_qk, k * f, decay, s0)
    else:
        k_row, w_row = (eg, f) if rk is None else (eg * rk, f * rk)
        out, state = _scan(q, k, v, t_beta, a_qk, k, decay, s0, q_row=eg * rq, k_row=k_row, w_row=w_row)
    out = out.reshape(b, hv, nc * c, dv)[:, :, :n]
    return out.to(in_dtype), state.reshape(b, hv, dk, dv)


def _recurrent(q, k, v, g, beta, initial_state, scale, use_qk_l2norm):
    """Per-token delta rule (decode); g (B, Hv, N) per head or (B, Hv, N, Dk) per channel."""
    in_dtype = v.dtype
    q, k, v, g, beta, state, rq, rk = _prepare(q, k, v, g, beta, initial_state, scale, use_qk_l2norm)
    q, k = q * rq, (k if rk is None else k * rk)
    alpha = g.exp()
    alpha = alpha.unsqueeze(-1) if g.dim() == 4 else alpha[..., None, None]  # (B, Hv, N, 1|Dk, 1)
    outs = []
    for t in range(v.shape[2]):
        state = state * alpha[:, :, t]
        k_t = k[:, :, t].unsqueeze(-2)  # (B, Hv, 1, Dk)
        delta = (v[:, :, t].unsqueeze(-2) - torch.matmul(k_t, state)) * beta[:, :, t, None, None]
        state = state + k_t.transpose(-1, -2) * delta
        outs.append(torch.matmul(q[:, :, t].unsqueeze(-2), state))
    out = torch.cat(outs, dim=2) if outs else v.new_zeros(v.shape)
    return out.to(in_dtype), state


# --- public functions --------------------------------------------------------------


def gated_delta_rule_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet, chunked (prefill).

    q, k: (B, Hk, N, Dk); v: (B, Hv, N, Dv), Hv % Hk == 0; g: (B, Hv, N) log-decay <= 0;
    beta: (B, Hv, N) in [0, 1]; initial_state: (B, Hv, Dk, Dv).
    Returns out (B, Hv, N, Dv) in v's dtype and the final state (B, Hv, Dk, Dv) float32
    (float64 for float64 inputs).
    """
    _check(q, k, v, g, beta, initial_state, per_channel=False)
    return _chunk(q, k, v, g, beta, initial_state, scale, use_qk_l2norm, chunk_size)


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet, one token at a time (decode). Shapes as ``gated_delta_rule_chunk``."""
    _check(q, k, v, g, beta, initial_state, per_channel=False)
    return _recurrent(q, k, v, g, beta, initial_state, scale, use_qk_l2norm)


def kda_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kimi Delta Attention (per-channel gated delta rule), chunked (prefill).

    As ``gated_delta_rule_chunk`` but g: (B, Hv, N, Dk), one log-decay per key channel;
    chunk_size a power of two.
    """
    _check(q, k, v, g, beta, initial_state, per_channel=True)
    return _chunk(q, k, v, g, beta, initial_state, scale, use_qk_l2norm, chunk_size)


def kda_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kimi Delta Attention, one token at a time (decode). g: (B, Hv, N, Dk)."""
    _check(q, k, v, g, beta, initial_state, per_channel=True)
    return _recurrent(q, k, v, g, beta, initial_state, scale, use_qk_l2norm)


def delta_rule_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeltaNet (no decay: gated delta with g = 0), chunked. Shapes as ``gated_delta_rule_chunk``."""
    _check(q, k, v, None, beta, initial_state, per_channel=None)
    return _chunk(q, k, v, None, beta, initial_state, scale, use_qk_l2norm, chunk_size)


def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeltaNet, one token at a time (decode). Shapes as ``gated_delta_rule_chunk``."""
    _check(q, k, v, None, beta, initial_state, per_channel=None)
    return _recurrent(q, k, v, None, beta, initial_state, scale, use_qk_l2norm)
