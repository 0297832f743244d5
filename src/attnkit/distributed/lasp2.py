"""LASP-2: context parallelism for linear attention by one all-gather of the states.

Paper: Sun, Lan, Zhong, Qu, Cheng, "LASP-2: Rethinking Sequence Parallelism for Linear
Attention and Its Hybrid", arXiv:2502.07563 (2025).

Each rank holds a contiguous shard of q, k, v (``shard(x, group, "contiguous")``) and
the per-call inputs of the method (g, beta) sharded the same way. Rank r:

1. computes its shard's *local transition*: the state its tokens write from a zero
   initial state (plus, for a decayed or delta-rule method, how the shard maps an
   incoming state: S_end = A_r S_0 + B_r);
2. ONE all-gather of these transitions over the group (their size does not depend on
   the sequence length: H x Dk x Dv floats per rank and batch row, + H x Dk x Dk for
   the methods with A_r);
3. prefix-combines the transitions of ranks 0..r-1 into its initial state
   (S_r = A_{r-1} S_{r-1} + B_{r-1}; a plain sum for the methods without decay);
   non-causal: the sum of every other rank's state (an all-reduce done as the same
   all-gather);
4. its output: for the gated and delta-rule kinds below, from the local pass itself
   (the state's read is linear in the prefix S: o_t = o_t(0) + r_t S); for the additive
   kinds, the method run again on its shard with ``initial_state`` = the prefix.
   Rank 0 (causal) needs no prefix: its local pass is its output, and the last rank's
   transition is read by no one, so it runs only the output pass: every rank runs the
   method once at 2 ranks, ranks 1..R-2 twice at more (additive kinds).

Every stateful linear method runs through ``ak.attention`` (its own ``initial_state`` /
``return_state``), so the result is the single-process one. The transition kinds:

- gated ``KVState`` methods (retnet, lightning, gla: the method's ``log_decay``):
  S_end = diag(exp(b)) S_0 + B, b the shard's summed log-decay, and the read of the
  prefix is the decayed query, r_t = scale q_t exp(b_t) (the paper's form): one plain
  pass of the method, a (Dk,) decay per head gathered with B.
- delta-rule ``KVState`` methods (delta, gated_delta, kda): the final state is affine in
  the initial one, S_end = A S_0 + B with A a full Dk x Dk matrix. A and B come from ONE
  local pass: the value columns of the recurrence evolve independently, so running the
  method on v' = [v, 0_{Dk}] from S_0' = [0, I_{Dk}] gives S_end' = [B, A], and the
  extra output columns are the read r_t of the prefix.
- ``LinearState`` (linear, based, hedgehog) and ``CosformerState``: no decay, A = I: the
  states add (cosformer's local pass starts at its global position, ``seen``).
- ``PerformerState``: the states add at a common scale (the larger offset).

Deviations from the paper: its algorithm computes the output as the intra-shard part
plus Q times the gathered prefix, one pass; that holds here for the gated and delta-rule
kinds (for the delta rule the probe columns are the Q-side read), while the additive kinds (normalised feature maps,
whose output is a ratio the method's API returns already divided) run the method again
from the prefix, so that any method works unchanged through its own API. For the delta
rule (not covered by the paper, whose methods are additive or gated) the affine map A_r is
gathered, not a sequential send/recv of the state along the ranks: the ranks stay
parallel (a sequential pass would serialise R shard passes) at the price of Dk more
value columns in the local pass and Dk x Dk more floats per head in the gather.
The zigzag layout is refused: a linear method's work per token is the same everywhere
(nothing to balance) and the prefix needs shards in sequence order. Gradients are exact:
the all-gather is an ``autograd.Function`` whose backward all-reduces the gradient of
the gathered transitions and keeps the own slice.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..methods.linear.base import LinearMethod
from ..methods.linear.state import CosformerState, KVState, LinearState, PerformerState, state_dtype
from .sharding import check_same_length, padded_len

_NEG = -1e30  # the offset of an empty performer state: exp(_NEG - x) = 0, and max() ignores it


class _AllGather(torch.autograd.Function):
    """(L,) on each rank -> (R, L), every rank's packet; backward: all-reduce of the
    gradient (every rank's use of packet j), then rank j keeps row j. ``anchors`` (unused
    in forward, zero gradient) make the output require grad on a rank whose own packet
    does not (a shard of padding only), so every rank takes part in the backward's
    collective, and give that rank's inputs a zero gradient rather than None."""

    @staticmethod
    def forward(ctx, packet, group, *anchors):
        parts = [torch.empty_like(packet) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, packet.contiguous(), group=group)
        ctx.group, ctx.rank = group, dist.get_rank(group)
        ctx.anchors = [(a.shape, a.dtype, a.device) for a in anchors]
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        zeros = [torch.zeros(s, dtype=d, device=dev) if need else None
                 for (s, d, dev), need in zip(ctx.anchors, ctx.needs_input_grad[2:])]
        return (grad[ctx.rank], None, *zeros)


# --- transition kinds: local pass, empty transition, combine, state -------------------


class _Additive:
    """LinearState (linear, based, hedgehog): S and z add. A kind is built per call with
    the configured method, the effective scale and this shard's per-call inputs."""

    names = ("S", "z")
    one_pass = False  # True: the local pass gives the output for any prefix

    def __init__(self, m, scale: float, inputs: dict):
        self.m, self.scale, self.inputs = m, scale, inputs

    @staticmethod
    def config(config: dict, total_len: int) -> dict:
        return config

    def start(self, q, k, v, pos: int):
        """The initial state of the local pass (None: zero)."""
        return None

    def local(self, run, q, k, v, pos: int) -> tuple[dict, torch.Tensor]:
        """(this shard's transition, its output from a zero prefix (B, Ho, n', Dv))."""
        out, st = run(q, k, v, self.start(q, k, v, pos))
        return {n: getattr(st, n) for n in self.names if getattr(st, n) is not None}, out

    def output(self, run, q, k, v, pos: int, local_out, prefix: Optional[dict]) -> torch.Tensor:
        """The shard's output from the prefix transition (None: nothing before it)."""
        if prefix is None and local_out is not None:
            return local_out  # the local pass started where this shard starts
        return run(q, k, v, self.start(q, k, v, pos) if prefix is None else self.state(prefix, pos))[0]

    def empty(self, q, k, v) -> dict:
        shapes = self.m.state_shapes(q, k, v)
        dt = state_dtype(q.dtype)
        return {n: torch.zeros(shapes[n], dtype=dt, device=q.device) for n in self.names if shapes.get(n)}

    def combine(self, prev: dict, cur: dict) -> dict:
        """The transition of prev's tokens followed by cur's."""
        return {n: prev[n] + cur[n] for n in cur}

    def state(self, t: dict, pos: int):
        return LinearState(S=t["S"], z=t.get("z"))


class _Cosformer(_Additive):
    """CosformerState: additive; M fixed to the whole length, local pass at its position."""

    names = ("S_cos", "S_sin", "z_cos", "z_sin")

    @staticmethod
    def config(config, total_len):
        return config if config.get("max_len", 0) else {**config, "max_len": total_len}

    def start(self, q, k, v, pos):
        return CosformerState(**self.empty(q, k, v), seen=pos)

    def state(self, t, pos):
        return CosformerState(**t, seen=pos)


class _Performer(_Additive):
    """PerformerState: S, z stored at scale exp(-offset); add at the larger offset."""

    names = ("S", "z", "offset")

    def empty(self, q, k, v):
        e = super().empty(q, k, v)
        return {**e, "offset": torch.full_like(e["offset"], _NEG)}

    def combine(self, prev, cur):
        off = torch.maximum(prev["offset"], cur["offset"])
        a, b = (prev["offset"] - off).exp(), (cur["offset"] - off).exp()
        return {"S": a[..., None, None] * prev["S"] + b[..., None, None] * cur["S"],
                "z": a[..., None] * prev["z"] + b[..., None] * cur["z"], "offset": off}

    def state(self, t, pos):
        return PerformerState(**t)


class _Affine(_Additive):
    """KVState, delta rule (delta, gated_delta, kda) or any affine recurrence:
    S_end = A S_0 + B, from one probe pass, whose probe columns also give the output's
    read of the prefix: o = o_0 + r_t S."""

    names = ("A", "B")
    one_pass = True

    def local(self, run, q, k, v, pos):
        dk, dv = k.shape[-1], v.shape[-1]
        b, h = v.shape[0], self.m.state_shapes(q, k, v)["S"][1]
        dt = state_dtype(q.dtype)
        eye = torch.eye(dk, dtype=dt, device=q.device).expand(b, h, dk, dk)
        s0 = torch.cat([torch.zeros(b, h, dk, dv, dtype=dt, device=q.device), eye], dim=-1)
        # in the compute dtype (the method's own), so the read r_t is not rounded to fp16 / bf16
        out, st = run(q.to(dt), k.to(dt), F.pad(v.to(dt), (0, dk)), KVState(S=s0))
        return {"A": st.S[..., dv:], "B": st.S[..., :dv]}, out

    def output(self, run, q, k, v, pos, local_out, prefix):
        """o_t = o_t(S = 0) + (probe output)_t S_prefix: the state's read is linear in S."""
        dv = v.shape[-1]
        out, read = local_out[..., :dv], local_out[..., dv:]
        if prefix is None:
            return out
        grp = out.shape[1] // prefix["B"].shape[1]  # GQA: query head i reads state head i // grp
        return out + read @ prefix["B"].repeat_interleave(grp, dim=1).to(read.dtype)

    def empty(self, q, k, v):
        b, h, dk, dv = self.m.state_shapes(q, k, v)["S"]
        dt = state_dtype(q.dtype)
        eye = torch.eye(dk, dtype=dt, device=q.device).expand(b, h, dk, dk).contiguous()
        return {"A": eye, "B": torch.zeros(b, h, dk, dv, dtype=dt, device=q.device)}

    def combine(self, prev, cur):
        return {"A": cur["A"] @ prev["A"], "B": cur["A"] @ prev["B"] + cur["B"]}

    def state(self, t, pos):
        return KVState(S=t["B"])  # the state from S = 0 at position 0


class _Gated(_Affine):
    """KVState, gated (retnet, lightning, gla: ``log_decay``): A = diag(exp(sum g)), and
    the read of the prefix is the decayed query, o_t = o_t(0) + scale (q_t * exp(b_t)) S,
    b_t = g_1 + ... + g_t within the shard (the paper's form). One pass, no probe."""

    names = ("a", "B")

    def _decay(self, k):
        """(B, H, n, Dk | 1) the cumulative log-decay within the shard."""
        g = self.m.log_decay(k, self.inputs).to(state_dtype(k.dtype))
        return (g if g.dim() == 4 else g.unsqueeze(-1)).cumsum(2)

    def local(self, run, q, k, v, pos):
        out, st = run(q, k, v, None)
        b = self._decay(k)
        return {"a": b[:, :, -1].exp().expand(*b.shape[:2], k.shape[-1]), "B": st.S}, out

    def output(self, run, q, k, v, pos, local_out, prefix):
        if prefix is None:
            return local_out
        s = prefix["B"]
        grp = q.shape[1] // s.shape[1]  # GQA: query head i reads state head i // grp
        qd = q.to(s.dtype) * self._decay(k).exp().repeat_interleave(grp, dim=1)
        return local_out + self.scale * (qd @ s.repeat_interleave(grp, dim=1)).to(local_out.dtype)

    def empty(self, q, k, v):
        b, h, dk, dv = self.m.state_shapes(q, k, v)["S"]
        dt = state_dtype(q.dtype)
        return {"a": torch.ones(b, h, dk, dtype=dt, device=q.device),
                "B": torch.zeros(b, h, dk, dv, dtype=dt, device=q.device)}

    def combine(self, prev, cur):
        return {"a": cur["a"] * prev["a"], "B": cur["a"][..., None] * prev["B"] + cur["B"]}


def _kind(m) -> type:
    """The transition kind of a configured method: by its state class (and, for KVState,
    whether it is a plain gated recurrence, ``log_decay``)."""
    kinds = {KVState: _Affine, LinearState: _Additive, PerformerState: _Performer, CosformerState: _Cosformer}
    state_cls = getattr(m, "State", None)
    if state_cls not in kinds or "initial_state" not in getattr(m, "inputs", ()):
        raise ValueError(f"lasp2 runs the linear methods with a recurrent state (initial_state / return_state); "
                         f"{m.name!r} has none (use ring_attention or ulysses_attention)")
    if state_cls is KVState and type(m).log_decay is not LinearMethod.log_decay:
        return _Gated  # retnet, lightning, gla; any other KVState method (the delta rule): the probe
    return kinds[state_cls]


# --- packing: one flat tensor per rank for the one all-gather -------------------------


def _pack(t: dict) -> torch.Tensor:
    return torch.cat([t[n].reshape(-1) for n in sorted(t)])


def _unpack(flat: torch.Tensor, like: dict) -> dict:
    out, i = {}, 0
    for n in sorted(like):
        size = like[n].numel()
        out[n] = flat[i:i + size].view(like[n].shape)
        i += size
    return out


def _prefix(kind, parts: list[dict], rank: int, causal: bool) -> Optional[dict]:
    """The transition before this rank's shard: ranks 0..rank-1 in order (causal), or
    every other rank (non-causal: the states add); None when there is none."""
    before = parts[:rank] if causal else parts[:rank] + parts[rank + 1:]
    prefix = None
    for t in before:
        prefix = t if prefix is None else kind.combine(prefix, t)
    return prefix


def _split(m, config_and_inputs: dict) -> tuple[dict, dict]:
    """(config, per-call inputs) of the keyword arguments; initial/return state refused."""
    for bad in ("initial_state", "return_state", "return_lse"):
        if bad in config_and_inputs:
            raise ValueError(f"lasp2 does not take {bad!r}: the initial state of each shard is the prefix "
                             f"of the ranks before it")
    inputs = {n: t for n, t in config_and_inputs.items() if n in m.inputs}
    return {n: c for n, c in config_and_inputs.items() if n not in inputs}, inputs


def lasp2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    method: str = "linear",
    causal: bool = True,
    layout: str = "contiguous",
    total_len: Optional[int] = None,
    scale: Optional[float] = None,
    return_stats: bool = False,
    **config_and_inputs: Any,
):
    """Context-parallel linear attention (LASP-2) of this rank's contiguous shard.

    q: (B, Hq, n, Dk); k: (B, Hkv, n, Dk); v: (B, Hkv, n, Dv) (delta-rule methods: q, k
    Hk heads, v Hv = m Hk): this rank's ``shard(x, group, "contiguous")``, the same n on
    every rank. total_len: the true length before ``shard`` padded it (default R * n).
    method: a linear method with a state (linear, retnet, lightning, gla, delta,
    gated_delta, kda, performer, cosformer, based, hedgehog); config fields and the
    method's per-call inputs (g (B, H, n[, Dk]), beta (B, H, n): this rank's shards) as
    keyword arguments. Returns out (B, Hq, n, Dv), this rank's shard (padded rows zero),
    then, when ``return_stats``, a dict: ``state_bytes`` (this rank's packet in the
    gather) and ``bytes_sent`` ((R - 1) x state_bytes, a ring all-gather; forward).
    Differentiable in q, k, v and the inputs (exact).
    """
    from ..api import attention, get

    if layout != "contiguous":
        raise ValueError(f"lasp2 uses the contiguous layout (got {layout!r}): linear attention costs the same per "
                         "token everywhere, so zigzag balances nothing, and the state prefix needs shards in order")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = q.shape[2]
    total_len = world * n if total_len is None else total_len
    check_same_length(total_len, group)
    if padded_len(total_len, world, "contiguous") != world * n:
        raise ValueError(f"a shard of {n} positions does not fit total_len={total_len} at {world} ranks (contiguous)")
    default = get(method)
    kind_cls = _kind(default)
    config, inputs = _split(default, config_and_inputs)
    config = kind_cls.config(config, total_len)
    m = get(method, **config)
    real = max(0, min(n, total_len - rank * n))  # this shard's positions before the padding
    pos = rank * n
    cut = [t[:, :, :real] for t in (q, k, v)]
    eff_scale = scale if scale is not None else 1.0 if m.unit_scale else q.shape[-1] ** -0.5
    kind = kind_cls(m, eff_scale, {name: t[:, :, :real] for name, t in inputs.items()})

    def run(qq, kk, vv, state, length=None):
        ins = kind.inputs if length is None else {name: t[:, :, :length] for name, t in inputs.items()}
        return attention(qq, kk, vv, method=method, causal=causal, scale=scale, initial_state=state,
                         return_state=True, **ins, **config)

    empty = kind.empty(*cut)
    # under causal no rank reads the last rank's transition: it runs the method once, from its prefix
    local = real and (kind.one_pass or not causal or rank < world - 1)
    mine, local_out = kind.local(run, *cut, pos) if local else (empty, None)
    if not local:  # the method's checks run here too, before the gather (an error on every rank, no hang)
        run(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, length=1)
    anchors = (q,) if local else (q, k, v, *inputs.values())
    gathered = _AllGather.apply(_pack(mine), group, *anchors)
    prefix = _prefix(kind, [_unpack(gathered[j], empty) for j in range(world)], rank, causal)
    if real:
        out = kind.output(run, *cut, pos, local_out, prefix)
    else:
        out = q.new_zeros(q.shape[0], max(q.shape[1], v.shape[1]), n, v.shape[-1])
    out = F.pad(out.to(q.dtype), (0, 0, 0, n - out.shape[2]))
    # every rank's output depends on the gather, so every rank runs its backward collective
    out = out + (0.0 * gathered.sum()).to(out.dtype)
    if not return_stats:
        return out
    state_bytes = gathered.shape[1] * gathered.element_size()
    return out, {"state_bytes": state_bytes, "bytes_sent": (world - 1) * state_bytes}
