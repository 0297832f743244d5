"""DeltaNet: linear attention whose state is written by the delta rule.

Paper: Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the Delta
Rule over Sequence Length", arXiv:2406.06484 (2024); the rule itself: Schlag, Irie,
Schmidhuber, "Linear Transformers Are Secretly Fast Weight Programmers", arXiv:2102.11174.

S_t = S_{t-1} + k_t (beta_t (v_t - S_{t-1}^T k_t))^T, o_t = S_t^T (scale q_t): each token
writes the error of the state's prediction of v_t, with strength ``beta`` (B, Hv, N) in
[0, 1] (an input). q and k are L2-normalised first when ``use_qk_l2norm`` (default True,
as fla's DeltaNet layer and transformers' delta-rule callers run it; without it the rule
is stable only for keys of norm <= 1). Forms: ``chunk`` (the paper's WY / UT chunkwise
algorithm, ``delta_rule.py``), ``recurrent`` (per token, decode), ``parallel`` (one chunk
over the whole sequence: O(N^2) memory, a check). Heads: q and k share Hk heads, v has
Hv = a multiple of Hk (transformers' convention; ``validate.check_linear_heads``), the
state and beta are per value head. Deviations: the operator only (the short convolutions,
the beta projection and the output norm are the layer's); ``scale`` defaults to Dk^-0.5.
Causal only. State: ``KVState`` (S (B, Hv, Dk, Dv)).

``DeltaRuleMethod`` here is the base of ``gated_delta`` and ``kda`` too: they add the
decay ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

from ... import validate
from ...registry import register
from . import delta_rule
from .base import LinearConfig, LinearMethod
from .state import KVState, state_dtype


@dataclass
class DeltaConfig(LinearConfig):
    """use_qk_l2norm: L2-normalise q and k before the recurrence (transformers'
    ``use_qk_l2norm_in_kernel``, which its delta-rule layers always pass as True)."""

    use_qk_l2norm: bool = True


class DeltaRuleMethod(LinearMethod):
    """The delta-rule methods: value-head grouping, beta, an optional decay g, causal only."""

    inputs = ("beta", "initial_state")
    grouping = "value"
    decay: ClassVar[Optional[str]] = None  # None | "head" (B, Hv, N) | "channel" (B, Hv, N, Dk)
    chunk_fn: ClassVar[Callable]
    recurrent_fn: ClassVar[Callable]

    def _check_supported(self, causal: bool, gqa: bool) -> None:
        if not causal:
            raise ValueError(
                f"method {self.name!r} is causal only: the delta rule is a recurrence over the sequence (each "
                f"token corrects the state left by the ones before it); pass causal=True"
            )
        super()._check_supported(causal, gqa)

    def state_shapes(self, q, k, v):
        return {"S": (v.shape[0], v.shape[1], k.shape[-1], v.shape[-1])}

    def check_inputs(self, q, k, v, causal, inputs, check_finite=True):
        super().check_inputs(q, k, v, causal, inputs, check_finite)
        b, hv, n = v.shape[:3]
        dk = k.shape[-1]
        if self.decay is not None:
            g = inputs.get("g")
            want = (b, hv, n) if self.decay == "head" else (b, hv, n, dk)
            if g is None:
                raise ValueError(f"method {self.name!r} needs its decay: pass g, a log-space decay (<= 0) of shape "
                                 f"{want} (B, Hv, N{'' if self.decay == 'head' else ', Dk'}; Hv = the value heads)")
            if self.decay == "channel" and tuple(g.shape) == (b, hv, n):
                raise ValueError(f"method {self.name!r} has one decay per key channel: g must be {want} "
                                 f"(B, Hv, N, Dk); for one decay per head use method 'gated_delta'")
            validate.check_log_decay(g, b, hv, n, dk, q, per_channel=self.decay == "channel")
        if inputs.get("beta") is None:
            raise ValueError(f"method {self.name!r} needs beta, the delta rule's write strength in [0, 1], of shape "
                             f"{(b, hv, n)} (B, Hv, N); e.g. torch.sigmoid(x)")
        validate.check_beta(inputs["beta"], b, hv, n, q)

    def run(self, q, k, v, causal, scale, form, inputs):
        state = inputs.get("initial_state")
        kw = dict(initial_state=None if state is None else state.S, scale=scale,
                  use_qk_l2norm=self.config.use_qk_l2norm)
        # float16 / bfloat16 run in float32 (the kernels cast; the state is float32)
        q, k, v = (t.to(state_dtype(q.dtype)) for t in (q, k, v))
        args = (q, k, v) + ((inputs["g"],) if self.decay else ()) + (inputs["beta"],)
        if form == "recurrent":
            out, s = type(self).recurrent_fn(*args, **kw)
        else:
            size = self.config.chunk_size
            if form == "parallel":  # one chunk over the whole sequence (a power of two for kda)
                size = 1 << max(q.shape[2] - 1, 0).bit_length()
            out, s = type(self).chunk_fn(*args, chunk_size=size, **kw)
        return out, KVState(S=s)


@register(
    "delta",
    family="linear",
    paper="Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
    arxiv="2406.06484",
    year=2024,
    supports=("causal", "decode", "gqa"),
)
class DeltaNet(DeltaRuleMethod):
    """DeltaNet: the state is corrected toward each v_t by the delta rule, strength beta."""

    chunk_fn = staticmethod(delta_rule.delta_rule_chunk)
    recurrent_fn = staticmethod(delta_rule.delta_rule_recurrent)

    @dataclass
    class Config(DeltaConfig):
        pass
