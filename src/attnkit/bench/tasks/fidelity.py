"""Operator fidelity on real activations: q, k, v captured from chosen layers of the model
on real text, then each method against exact attention.

Capture goes through transformers' own extension point: a temporary attention function
registered with ``AttentionInterface`` records q, k, v exactly as attention receives them
(RoPE applied, GQA heads not repeated) and computes exact attention; the forward stops
after the last chosen layer. Per (layer, method):

- ``rel_error`` = ||o - o*|| / ||o*|| over all heads and rows, o* in float64;
- ``recall`` = share of the exact softmax mass inside the method's allowed set
  (``stats.pattern``), averaged over query rows and heads, computed in row chunks so
  memory stays O(chunk x N);
- ``density`` = allowed pairs / causal pairs (``stats.density``).

Linear-family methods (``docs/linear.md``) run on the same captured q, k, v: they have no
pattern and no softmax weights, so ``recall`` is None, and ``density`` is None when the method reports none (the
state-based methods: every causal pair reaches the output through the state, with
weights that are not a softmax, so "share of pairs kept" does not apply; None also keeps
them off the error-vs-density plot and the equal-density comparison); ``sigmoid``
reports its own density (pairs inside its window). Per-call inputs a method needs (``g``,
``beta``) are generated, seeded per case (``bench/linear_inputs.py``: random gates, not a
trained layer's); the delta-rule methods, whose q and k share heads, get the model's K/V
heads repeated to its query heads (as GQA softmax reads them). A non-causal-only method
(``agent``) is not applicable: the task compares causal attention.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ...errors import NotApplicable
from ...kernels import attention_with_lse
from ..spec import MethodSpec, TaskSpec
from .base import Case, Context, Section, Task, case_seed, register_task
from .perplexity import token_ids

CAPTURE = "attnkit_capture"


class _Stop(Exception):
    """Raised by the capture function after the last wanted layer: the rest is not needed."""


def capture_qkv(model: Any, input_ids: torch.Tensor, layers: list[int]) -> dict[int, dict[str, Any]]:
    """{layer: {"q": (B, Hq, N, D), "k", "v": (B, Hkv, N, D), "scale": float}} of one forward."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    wanted, last = set(layers), max(layers)
    found: dict[int, dict[str, Any]] = {}

    def capture(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        idx = getattr(module, "layer_idx", None)
        if idx in wanted:
            found[idx] = {"q": query.detach().clone(), "k": key.detach().clone(), "v": value.detach().clone(),
                          "scale": scaling}
        if idx == last:
            raise _Stop
        t, t_kv = query.shape[2], key.shape[2]
        causal = attention_mask is None and t > 1 and t == t_kv
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out, _ = attention_with_lse(query, key, value, scale, causal=causal, mask=attention_mask)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(CAPTURE, capture)
    # A library that re-wrapped every registered function at import (kvpress does, via
    # ALL_ATTENTION_FUNCTIONS[name] = ...) leaves an instance entry that shadows register():
    # it would call the capture function of an earlier call. Set the instance entry too.
    ALL_ATTENTION_FUNCTIONS[CAPTURE] = capture
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    except _Stop:
        pass
    finally:
        model.set_attn_implementation(before)
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"tasks.fidelity.layers: layers {missing} were not reached; "
                         f"the model has layers 0..{model.config.num_hidden_layers - 1}")
    return found


def allowed_rows(pattern: Any, r0: int, r1: int, heads: int) -> torch.Tensor:
    """(heads, r1 - r0, Nk) bool: rows r0..r1 of ``pattern``'s allowed set (batch 0)."""
    from ...kernels.pattern import block_mask_from_lists

    bq, bk = pattern.block_q, pattern.block_k
    qb0, qb1 = r0 // bq, (r1 - 1) // bq + 1
    listed = block_mask_from_lists(pattern.kv_blocks[:1, :, qb0:qb1], pattern.num_kv_blocks)
    listed = listed.repeat_interleave(bq, dim=2)[:, :, r0 - qb0 * bq: r1 - qb0 * bq]
    listed = listed.repeat_interleave(bk, dim=3)[..., : pattern.kv_len]
    allowed = listed.expand(1, heads, r1 - r0, pattern.kv_len)
    if pattern.mask_mod is not None:
        device = listed.device
        b = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        h = torch.arange(heads, device=device)[None, :, None, None]
        q_pos = torch.arange(r0, r1, device=device)[None, None, :, None] + pattern.q_offset
        k_pos = torch.arange(pattern.kv_len, device=device)[None, None, None, :]
        allowed = allowed & pattern.mask_mod(b, h, q_pos, k_pos)
    return allowed[0].expand(heads, r1 - r0, pattern.kv_len)


def _exact_rows(q64: torch.Tensor, k64: torch.Tensor, r0: int, r1: int, scale: float, kv_len: int) -> torch.Tensor:
    """(Hq, r1 - r0, Nk) float64 exact causal softmax of query rows r0..r1 (bottom-right aligned)."""
    n = q64.shape[1]
    logits = torch.einsum("hqd,hkd->hqk", q64[:, r0:r1], k64) * scale
    causal = torch.arange(kv_len)[None, :] <= torch.arange(r0, r1)[:, None] + (kv_len - n)
    return torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)


def _heads64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch 0 in float64, K/V repeated to the query heads: (Hq, N, D) each."""
    group = q.shape[1] // k.shape[1]
    return q[0].double(), k[0].double().repeat_interleave(group, dim=0), v[0].double().repeat_interleave(group, dim=0)


def exact_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: int = 256) -> torch.Tensor:
    """(Hq, N, Dv) float64 exact causal attention of batch 0, in row chunks (O(chunk x N) memory).

    Computed once per captured layer and shared by every method measured on it."""
    q64, k64, v64 = _heads64(q, k, v)
    n = q64.shape[1]
    out = torch.empty(q64.shape[0], n, v64.shape[-1], dtype=torch.float64)
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        out[:, r0:r1] = _exact_rows(q64, k64, r0, r1, scale, k.shape[2]) @ v64
    return out


def compare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, pattern: Any,
            scale: float, chunk: int = 256, reference: Optional[torch.Tensor] = None,
            recall_stride: int = 1) -> dict[str, Optional[float]]:
    """Relative error of ``out`` against exact causal attention (float64) and the exact
    softmax mass inside ``pattern`` (None: every causal pair allowed; batch 0 only).

    q: (1, Hq, N, D); k, v: (1, Hkv, N, D); out: (1, Hq, N, D). ``reference``: the
    ``exact_output`` of these inputs if already computed. ``recall_stride``: measure the
    mass recall on every ``recall_stride``-th chunk of query rows only (1 = all rows;
    larger values trade exactness of the recall for time at long lengths).
    """
    hq, n = q.shape[1], q.shape[2]
    q64, k64, v64 = _heads64(q, k, v)
    err_sq, ref_sq, mass, rows = 0.0, 0.0, 0.0, 0
    for i, r0 in enumerate(range(0, n, chunk)):
        r1 = min(r0 + chunk, n)
        want_recall = i % recall_stride == 0
        p = _exact_rows(q64, k64, r0, r1, scale, k.shape[2]) if reference is None or want_recall else None
        ref = reference[:, r0:r1] if reference is not None else p @ v64
        err_sq += (out[0, :, r0:r1].double() - ref).pow(2).sum().item()
        ref_sq += ref.pow(2).sum().item()
        if not want_recall:
            continue
        rows += r1 - r0
        if pattern is not None:
            mass += (p * allowed_rows(pattern, r0, r1, hq)).sum().item()
        else:
            mass += float(hq * (r1 - r0))
    return {"rel_error": math.sqrt(err_sq / max(ref_sq, 1e-300)), "recall": mass / (hq * rows)}


@register_task("fidelity")
class Fidelity(Task):
    score_name = "rel_error"
    higher_is_better = False
    section = Section(title="Fidelity on captured activations", layout="fidelity", figures=("error_vs_density",),
                      order=20)

    @dataclass
    class Params:
        layers: list[int] = field(default_factory=lambda: [2, 15])
        haystack: str = "licenses"
        recall_stride: int = 1  # mass recall on every k-th chunk of 256 query rows (1 = all)

        def check(self) -> None:
            if isinstance(self.layers, int) or not all(isinstance(x, int) and x >= 0 for x in self.layers):
                raise ValueError(f"tasks.fidelity.layers: must be a list of layer indices >= 0, got {self.layers!r}")
            value = self.recall_stride
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tasks.fidelity.recall_stride: must be an integer >= 1, got {value!r}")

    def variants(self, spec: TaskSpec) -> list[str]:
        return [f"layer{i}" for i in spec.params.layers]

    def captured(self, ctx: Context, case: Case, spec: TaskSpec) -> dict[int, dict[str, Any]]:
        # One forward per (length, sample) captures every chosen layer; the seed must not
        # depend on the variant (layer) so all layers see the same text.
        key = ("fidelity", case.length, case.sample)
        if key not in ctx.memo:
            for old in [k for k in ctx.memo if isinstance(k, tuple) and k[:1] == ("fidelity",)]:
                del ctx.memo[old]
            seed = case_seed(ctx.seed, "fidelity", case.length, case.sample)
            ids = torch.tensor([token_ids(ctx.lm.tokenizer, case.length, seed, spec.params.haystack)])
            ctx.memo[key] = capture_qkv(ctx.lm.model, ids, list(spec.params.layers))
        return ctx.memo[key]

    @staticmethod
    def linear_call(m: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context,
                    case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(q, k, v, per-call inputs) for method ``m`` on captured q, k, v: unchanged and {}
        for a softmax method (module doc for the linear family)."""
        from ..linear_inputs import method_inputs

        if "causal" not in m.info.supports:
            raise NotApplicable(f"method {m.name!r} is non-causal only; the fidelity task compares causal attention "
                                f"on a causal model's q, k, v")
        if getattr(m, "grouping", "gqa") == "value" and k.shape[1] != q.shape[1]:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        seed = case_seed(ctx.seed, "fidelity_inputs", case.length, case.sample)
        return q, k, v, method_inputs(m, q, k, v, seed=seed)

    def measure(self, ctx: Context, case: Case, method: MethodSpec, spec: TaskSpec) -> dict[str, Any]:
        from ... import api, registry

        layer = int(case.variant.removeprefix("layer"))
        cap = self.captured(ctx, case, spec)[layer]
        q, k, v, scale = cap["q"], cap["k"], cap["v"], cap["scale"]
        start = time.perf_counter()
        name, config = (method.name, method.method_config) if layer >= method.dense_layers else ("full", {})
        config = registry.for_layer(name, config, layer)  # per-layer calibrations (sea's estimator, plans)
        m = api.get(name, **config)
        qm, km, vm, inputs = self.linear_call(m, q, k, v, ctx, case)
        with torch.inference_mode():
            out, stats = api.attention(qm, km, vm, method=name, causal=True, scale=scale, return_stats=True, **config,
                                       **inputs)
        seconds = time.perf_counter() - start
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        ref_key = ("fidelity_ref", case.length, case.sample, layer)
        if ref_key not in ctx.memo:
            for old in [k for k in ctx.memo if isinstance(k, tuple) and k[:1] == ("fidelity_ref",)
                        and k[1:3] != (case.length, case.sample)]:
                del ctx.memo[old]
            ctx.memo[ref_key] = exact_output(q, k, v, scale)
        result = compare(q, k, v, out, stats.pattern, scale, reference=ctx.memo[ref_key],
                         recall_stride=spec.params.recall_stride)
        density = None if stats.density != stats.density else stats.density  # NaN: the method reports none
        if stats.pattern is None and (density is None or density < 1.0 or m.info.family == "linear"):
            result["recall"] = None  # no pattern to measure coverage against (linear: no softmax weights)
        extra = {"generated_inputs": sorted(inputs)} if inputs else {}
        return {
            "score": result["rel_error"],
            **result,
            **extra,
            "density": density,
            "method_seconds": seconds,
            "estimator_seconds": stats.estimator_seconds,
            "backend": stats.backend,
            "heads": int(q.shape[1]),
            "kv_heads": int(k.shape[1]),
        }
