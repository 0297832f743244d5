"""Input checks, in one place, with messages that say what was wrong and what is allowed."""

from __future__ import annotations

import difflib
import typing
from typing import Any, NoReturn, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def unknown_name(what: str, name: str, valid: Sequence[str]) -> NoReturn:
    """Raise a ValueError for an unknown ``what`` named ``name``, listing close matches."""
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown {what} {name!r}.{hint} Valid: {', '.join(valid)}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, check_finite: bool = True,
              grouping: str = "gqa") -> None:
    """Check q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) for attention.

    grouping "value" (delta-rule methods): q, k (B, Hk, N, D), v (B, Hv, N, Dv) with
    Hv % Hk == 0 instead (``check_linear_heads``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions (B, H, N, D), got {t.dim()} with shape {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; allowed: float32, float16, bfloat16 (float64 for tests)"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    (bq, hq, nq, dq), (bk, hk, nk, dk), (bv, hv, nv, _) = q.shape, k.shape, v.shape
    if not (bq == bk == bv):
        raise ValueError(f"batch size B differs: q has {bq}, k has {bk}, v has {bv}")
    if dq != dk:
        raise ValueError(f"head dim D differs: q has {dq}, k has {dk}; they must be equal")
    if nk != nv:
        raise ValueError(f"sequence length Nk differs: k has {nk}, v has {nv}")
    if grouping == "value":
        check_linear_heads(q, k, v, grouping="value")
    elif hk != hv:
        raise ValueError(f"KV heads differ: k has {hk}, v has {hv}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(
            f"query heads Hq={hq} must be a multiple of KV heads Hkv={hk} (GQA/MQA); "
            f"allowed Hkv: divisors of {hq}"
        )
    if nq == 0 or nk == 0:
        raise ValueError(f"empty sequence: Nq={nq}, Nk={nk}; both must be >= 1")
    if bq == 0 or dq == 0:
        raise ValueError(f"empty tensor: B={bq}, D={dq}; both must be >= 1")
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not _all_finite(t):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(
                    f"{name} contains {bad} NaN/Inf value(s); attention needs finite inputs "
                    f"(pass check_finite=False to skip this check)"
                )


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN / Inf in ``t``: for float32 / float64 a sum first (NaN / Inf propagate; about 2x faster
    than a min / max pass and 10x faster than ``torch.isfinite(t).all()``, which
    materialises a mask); a sum that overflows from finite values falls back to one
    aminmax pass (NaN propagates through min / max)."""
    t = t.detach()
    if t.dtype in (torch.float32, torch.float64) and bool(torch.isfinite(t.sum())):
        return True  # (a half-precision sum is slower than aminmax on the CPU)
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_causal_lengths(nq: int, nk: int, causal: bool) -> None:
    """Causal attention is bottom-right aligned: Nq > Nk would leave query rows with no key."""
    if causal and nq > nk:
        raise ValueError(
            f"causal attention with Nq={nq} > Nk={nk}: queries are the last Nq positions, so the "
            f"first {nq - nk} query rows would have no key; use Nq <= Nk or causal=False"
        )


def check_scale(scale: Any) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (scale > 0 and scale == scale and scale != float("inf")):
        raise ValueError(f"scale must be a finite number > 0 or None (1/sqrt(D)), got {scale}")


def check_type(method: str, key: str, value: Any, hint: Any) -> None:
    """A TypeError unless ``value`` of config field ``key`` fits the type hint ``hint``."""
    allowed = _allowed_types(hint)
    if allowed is None:
        return
    ok = any(_is_instance(value, t) for t in allowed)
    if not ok:
        names = " or ".join(sorted({getattr(t, "__name__", str(t)) for t in allowed}))
        raise TypeError(
            f"config field {key!r} of method {method!r} must be {names}, "
            f"got {value!r} ({type(value).__name__})"
        )


def _allowed_types(hint: Any) -> tuple | None:
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        out: list = []
        for arg in typing.get_args(hint):
            sub = _allowed_types(arg)
            if sub is None:
                return None
            out.extend(sub)
        return tuple(out)
    if origin in (tuple, list):
        return (origin,)
    if origin is typing.Literal:
        return None
    if hint is type(None):
        return (type(None),)
    if isinstance(hint, type):
        return (hint,)
    return None


def _is_instance(value: Any, t: type) -> bool:
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


def check_positive(method: str, **values: Any) -> None:
    """Each named integer hyper-parameter must be >= 1."""
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} of method {method!r} must be an integer >= 1, got {value!r}")


def check_non_negative(method: str, **values: Any) -> None:
    """Each named integer hyper-parameter must be >= 0."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} of method {method!r} must be an integer >= 0, got {value!r}")


def check_choice(method: str, key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(
            f"{key} of method {method!r} must be one of {', '.join(map(repr, choices))}, got {value!r}"
        )


def empty_row_error(query_index: int, batch: int, head: int, method: str) -> NoReturn:
    raise ValueError(
        f"the pattern of method {method!r} leaves query row {query_index} (batch {batch}, head {head}) "
        f"with no key to attend to; widen the pattern (e.g. window/sink) so every query sees at least one key"
    )


def check_no_empty_rows(lse: torch.Tensor, method: str) -> None:
    """Raise ``empty_row_error`` for the first query row whose log-sum-exp is -inf (no key).

    lse: (B, H, N)."""
    empty = torch.isneginf(lse)
    if bool(empty.any()):
        bb, hh, ii = (int(x) for x in empty.nonzero()[0])
        empty_row_error(ii, bb, hh, method)


# --- Linear family -------------------------------------------------------------------
#
# Head grouping of the linear family (inputs are (B, H, N, D) like every method):
# - feature-map and decay methods (linear, retnet, lightning, gla): GQA as in softmax
#   attention. k and v share Hkv heads, q has Hq = a multiple of Hkv; the recurrent
#   state, and g, are per key/value head (B, Hkv, ...), and query head i reads the state
#   of head i // (Hq / Hkv).
# - delta-rule methods (gated_delta, kda; transformers' convention): q and k share Hk
#   heads, v may have Hv = a multiple of Hk heads; the state is per value head
#   (B, Hv, Dk, Dv) and g and beta are per value head (B, Hv, N[, Dk]); value head i uses
#   the q / k of head i // (Hv / Hk).
# Decay g is log-space (<= 0): (B, H, N) one scalar per head and token, or (B, H, N, Dk)
# one per key channel. beta (B, H, N) is the delta rule's write strength in [0, 1].


def check_linear_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grouping: str = "gqa") -> int:
    """Check the head counts of a linear method and return the state head count H.

    grouping "gqa": k, v share Hkv and Hq % Hkv == 0 (H = Hkv); "value": q, k share Hk and
    Hv % Hk == 0 (H = Hv)."""
    hq, hk, hv = q.shape[1], k.shape[1], v.shape[1]
    if grouping == "gqa":
        return hk  # check_qkv checked Hk == Hv and Hq % Hkv == 0
    if hq != hk:
        raise ValueError(f"q and k must have the same number of heads for this method, got q {hq}, k {hk}")
    if hk == 0 or hv % hk != 0:
        raise ValueError(f"value heads Hv={hv} must be a multiple of the q/k heads Hk={hk}")
    return hv


def check_same_length(method: str, nq: int, nk: int) -> None:
    """A linear method reads its state at the query's own position: Nq must equal Nk."""
    if nq != nk:
        raise ValueError(
            f"method {method!r} is a linear (recurrent) method and needs Nq == Nk, got Nq={nq}, Nk={nk}; "
            f"carry earlier tokens in a state instead (return_state=True, then initial_state=...)"
        )


def check_no_lse(method: str, return_lse: bool) -> None:
    if return_lse:
        raise ValueError(
            f"return_lse=True: method {method!r} is a linear method and has no softmax normaliser (log-sum-exp) "
            f"to return; use return_state=True to get its recurrent state"
        )


def check_inputs(method: str, given: dict, inputs: Sequence[str], fields: Sequence[str]) -> None:
    """Every per-call keyword must be one of the method's declared inputs."""
    unknown = [key for key in given if key not in inputs]
    if unknown:
        raise ValueError(
            f"unknown keyword(s) {', '.join(map(repr, unknown))} for method {method!r}; "
            f"per-call inputs: {', '.join(inputs) or '(none)'}; config fields: {', '.join(fields) or '(none)'}"
        )


def _input_tensor(name: str, t: Any, like: torch.Tensor) -> tuple[float, float]:
    """Type, dtype and device of a per-call tensor; returns its (min, max) (NaN if any is)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; allowed: float32, float16, bfloat16, float64")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but q is on {like.device}")
    if t.numel() == 0:
        return 0.0, 0.0
    lo, hi = torch.aminmax(t)  # one pass; NaN propagates
    if lo.isnan() or hi.isnan():
        return float("nan"), float("nan")
    return lo.item(), hi.item()


def check_log_decay(g: Any, batch: int, heads: int, n: int, dk: int, like: torch.Tensor,
                    per_channel: bool = True) -> None:
    """g: log-space decay, (B, H, N) per head or (B, H, N, Dk) per channel, every value
    finite and <= 0 (one pass over g, always: a positive or NaN g is a silently wrong result)."""
    lo, hi = _input_tensor("g", g, like)
    shapes = [(batch, heads, n)] + ([(batch, heads, n, dk)] if per_channel else [])
    if tuple(g.shape) not in shapes:
        raise ValueError(
            f"g must have shape {' or '.join(map(str, shapes))} (B, H, N[, Dk]; H = the state heads), "
            f"got {tuple(g.shape)}"
        )
    if lo != lo or lo == float("-inf"):
        raise ValueError("g contains NaN/-inf values; it must be finite (for a decay of ~0 use a large negative g, "
                         "e.g. -1e4)")
    if hi > 0:
        raise ValueError(
            f"g is a log-space decay and must be <= 0 (the decay exp(g) in (0, 1]), got a maximum of "
            f"{hi:.4g}; pass e.g. F.logsigmoid(x) or -softplus(x)"
        )


def check_beta(beta: Any, batch: int, heads: int, n: int, like: torch.Tensor) -> None:
    """beta: (B, H, N), the delta rule's write strength, every value in [0, 1] (NaN refused)."""
    lo, hi = _input_tensor("beta", beta, like)
    if tuple(beta.shape) != (batch, heads, n):
        raise ValueError(f"beta must have shape {(batch, heads, n)} (B, H, N), got {tuple(beta.shape)}")
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(
            f"beta must lie in [0, 1] (the delta rule's write strength), got values in "
            f"[{lo:.4g}, {hi:.4g}]; pass e.g. torch.sigmoid(x)"
        )


def check_state(method: str, state: Any, state_cls: type, shapes: dict, dtype: torch.dtype, like: torch.Tensor) -> None:
    """``state`` must be a ``state_cls`` whose tensors have ``shapes`` (field -> shape, None
    for a field that must be None) and ``dtype``."""
    if not isinstance(state, state_cls):
        raise TypeError(
            f"initial_state of method {method!r} must be a {state_cls.__name__} (from return_state=True), "
            f"got {type(state).__name__}"
        )
    for field, shape in shapes.items():
        t = getattr(state, field)
        if shape is None:
            if t is not None:
                raise ValueError(f"initial_state.{field} must be None for this configuration of {method!r}")
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"initial_state.{field} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"initial_state.{field} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(
                f"initial_state.{field} must be {dtype} for {like.dtype} inputs (float32 for fp16/bf16/fp32, "
                f"float64 for float64), got {t.dtype}"
            )
        if t.device != like.device:
            raise ValueError(f"initial_state.{field} is on {t.device} but q is on {like.device}")
