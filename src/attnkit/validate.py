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


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, check_finite: bool = True) -> None:
    """Check q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) for attention."""
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
    if hk != hv:
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
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(
                    f"{name} contains {bad} NaN/Inf value(s); attention needs finite inputs "
                    f"(pass check_finite=False to skip this check)"
                )


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
