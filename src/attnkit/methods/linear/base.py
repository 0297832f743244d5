"""The base of the linear family: inputs, state, form choice and the call contract.

A linear method subclasses ``LinearMethod``: its ``Config`` extends ``LinearConfig``
(``form``, ``chunk_size``), it lists its per-call tensors in ``inputs`` (kept apart from
config fields), names its ``State`` class, and implements ``run`` (the feature map or the
decay it needs, then the shared kernels of ``chunked.py``). The base checks the inputs,
picks the form (``chunked.choose_form``) and returns out, state, stats in the API's order.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch

from ... import validate
from ..base import AttentionStats, Method
from .chunked import FORMS, choose_form, run_form
from .state import KVState, state_dtype


@dataclass
class LinearConfig:
    """form: "auto" (chunk for prefill, recurrent for decode) | "chunk" | "recurrent" |
    "parallel"; chunk_size: tokens per chunk of the chunked form."""

    form: str = "auto"
    chunk_size: int = 64


class LinearMethod(Method):
    """A linear-attention method: ``m(q, k, v, causal=True, initial_state=..., return_state=True)``."""

    inputs: ClassVar[tuple[str, ...]] = ("initial_state",)
    State: ClassVar[type] = KVState
    unit_scale: ClassVar[bool] = False  # True: scale defaults to 1 (not 1/sqrt(D))
    grouping: ClassVar[str] = "gqa"  # "value": q, k share Hk heads, v has Hv = m Hk (delta rule)

    def check_config(self) -> None:
        validate.check_choice(self.name, "form", self.config.form, ("auto",) + FORMS)
        validate.check_positive(self.name, chunk_size=self.config.chunk_size)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                 scale: Optional[float] = None, backend: str = "auto", return_stats: bool = False,
                 check_finite: bool = True, return_lse: bool = False, return_state: bool = False, **inputs: Any):
        """q: (B, Hq, N, Dk); k: (B, Hkv, N, Dk); v: (B, Hkv, N, Dv) -> out (B, Hq, N, Dv), then
        the state (``return_state``), then stats. ``inputs``: the method's per-call tensors."""
        fields = [f.name for f in dataclasses.fields(self.Config)]
        validate.check_inputs(self.name, inputs, self.inputs, fields)
        validate.check_no_lse(self.name, return_lse)
        validate.check_qkv(q, k, v, check_finite=check_finite, grouping=self.grouping)
        validate.check_scale(scale)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        validate.check_same_length(self.name, q.shape[2], k.shape[2])
        self._check_supported(causal, q.shape[1] != k.shape[1] or k.shape[1] != v.shape[1])
        if backend != "auto":
            raise ValueError(f"method {self.name!r} is a linear method: it picks a form (config field form=, one of "
                             f"{FORMS}), not a backend; backend must be 'auto', got {backend!r}")
        self.check_inputs(q, k, v, causal, inputs, check_finite)
        if scale is None:
            scale = 1.0 if self.unit_scale else 1.0 / math.sqrt(q.shape[-1])
        form = choose_form(self.config.form, q.shape[2])
        start = time.perf_counter()
        out, state = self.run(q, k, v, causal, float(scale), form, inputs)
        stats = AttentionStats(self.name, float("nan"), None, 0.0, form, time.perf_counter() - start)
        result = (out.to(q.dtype),) + ((state,) if return_state else ()) + ((stats,) if return_stats else ())
        return result[0] if len(result) == 1 else result

    def state_shapes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Optional[tuple]]:
        """Field -> shape of this method's state for these inputs (None: the field is None)."""
        return {"S": (k.shape[0], k.shape[1], k.shape[-1], v.shape[-1])}

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, inputs: dict,
                     check_finite: bool = True) -> None:
        """Check the per-call tensors (override to add g / beta); the state here."""
        state = inputs.get("initial_state")
        if state is not None:
            validate.check_state(self.name, state, self.State, self.state_shapes(q, k, v), state_dtype(q.dtype), q)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, form: str,
            inputs: dict) -> tuple[torch.Tensor, Any]:
        """(out (B, Hq, N, Dv) in the compute dtype, final state). Inputs are checked."""
        raise NotImplementedError

    def log_decay(self, k: torch.Tensor, inputs: dict) -> Optional[torch.Tensor]:
        """The log-space decay g this call's gated recurrence runs with ((B, H, N) or
        (B, H, N, Dk), H the state heads; k: (B, H, N, Dk)), or None when the method is
        not a plain gated recurrence (S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T).
        Context parallelism (LASP-2) carries a state across shards with it."""
        return None

    def run_decay(self, q, k, v, causal, scale, form, g, inputs) -> tuple[torch.Tensor, KVState]:
        """The shared kernel on the method's decay ``g`` (None, (B, H, N) or (B, H, N, Dk))."""
        dtype = state_dtype(q.dtype)
        state = inputs.get("initial_state")
        s0 = None if state is None else state.S
        q, k, v = (t.to(dtype) for t in (q, k, v))
        g = None if g is None else g.to(dtype)
        out, s = run_form(form, q, k, v, g, scale, s0, causal, self.config.chunk_size)
        return out, self.State(S=s)

    def patterns(self, q, k, causal, scale):
        return []

    def compatible_backends(self, q, k, v, causal=False, scale=None, training=False, return_lse=False):
        return [] if return_lse else ["auto"]


def run_normalized(form: str, fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, s0: Optional[torch.Tensor],
                   z0: Optional[torch.Tensor], causal: bool, chunk_size: int, eps: float,
                   scale: float = 1.0, g: Optional[torch.Tensor] = None,
                   feature: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised feature-map attention o = scale fq S / (scale fq z + eps) in ``form``.

    fq: (B, Hq, N, F), fk: (B, H, N, F) the features (compute dtype); v: (B, H, N, Dv);
    s0: (B, H, F, Dv) or None, z0: (B, H, F) or None; g: None or a per-head log-decay
    (B, H, N) applied to S and z alike (causal). The normaliser z rides along as one more
    value column of ones, so every form carries it with S exactly. ``feature``: fq, fk are
    the raw q, k and this map makes the features (the chunked form a row at a time: no
    whole-sequence feature tensor). Returns (out, S, z)."""
    s0 = None if s0 is None else torch.cat([s0, z0.unsqueeze(-1)], dim=-1)
    out, s = run_form(form, fq, fk, v, g, scale, s0, causal, chunk_size, feature=feature, eps=eps)
    return out, s[..., :-1], s[..., -1]
