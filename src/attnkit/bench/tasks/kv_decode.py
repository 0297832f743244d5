"""Decode speed and memory of a KV cache: prefill ``length`` tokens of real text, then
time ``decode_tokens`` greedy decode steps one by one (the first ``warmup`` steps are
not counted) and report the median milliseconds per token, and the bytes the cache holds
against the bytes of a full cache of the same tokens.

Without a cache setting it measures the normal cache (transformers' ``DynamicCache``,
the ``full`` baseline); with ``--cache POLICY --budgets ...`` an ``attnkit.KVCache``
(``cache.nbytes()``: keys, values, slot positions, policy state, observation window).
Both run attnkit's attention (``attnkit.patch(model, prefill=METHOD)``). The row of the
normal cache also times the same number of steps with the model unpatched (transformers'
own attention on the same cache, continuing after attnkit's steps):
``transformers_decode_ms_per_token`` and ``decode_speedup_vs_transformers``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from .. import haystack
from ..spec import CacheRun, MethodSpec, TaskSpec
from .base import Case, Context, Section, Task, register_task
from .model_speed import cache_bytes
from .perplexity import token_ids


@register_task("kv_decode")
class KVDecode(Task):
    uses_cache = True
    score_name = "decode_ms_per_token"
    higher_is_better = False
    section = Section(title="KV-cache decode speed and memory", layout="kv_decode", order=80)

    @dataclass
    class Params:
        decode_tokens: int = 32  # timed steps
        warmup: int = 2  # untimed steps before them
        haystack: str = "licenses"

        def check(self) -> None:
            for name, low in (("decode_tokens", 1), ("warmup", 0)):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    raise ValueError(f"tasks.kv_decode.{name}: must be an integer >= {low}, got {value!r}")
            if self.haystack not in haystack.KINDS:
                raise ValueError(f"tasks.kv_decode.haystack: unknown {self.haystack!r}; "
                                 f"allowed: {', '.join(haystack.KINDS)}")

    def measure(self, ctx: Context, case: Case, method: MethodSpec, spec: TaskSpec,
                cache: CacheRun | None = None) -> dict[str, Any]:
        import torch

        from ... import patching

        p = spec.params
        model = ctx.lm.model
        key = ("kv_decode", case.length, case.seed, p.haystack)
        if key not in ctx.memo:
            ctx.memo[key] = token_ids(ctx.lm.tokenizer, case.length, case.seed, p.haystack)
        ids = torch.tensor([ctx.memo[key]])
        kv = None if cache is None else cache.make()
        extra = {} if kv is None else {"past_key_values": kv}
        times: list[float] = []
        with torch.inference_mode(), patching.patch(model, prefill=method.name, **method.kwargs):
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **extra)
            prefill = time.perf_counter() - start
            kv = out.past_key_values
            held_after_prefill = kv.nbytes() if cache is not None else cache_bytes(kv)
            token = out.logits[:, -1:].argmax(-1)
            token = decode_steps(model, token, kv, p.warmup + p.decode_tokens, times)
        steps = [1000 * t for t in times[p.warmup:]]
        if cache is None:
            held = full = cache_bytes(kv)
            kept = float(kv.get_seq_length())
        else:
            stats = kv.stats()
            held, full = stats["nbytes"], stats["full_nbytes"]
            kept = sum(stats["kept_per_layer"]) / max(len(stats["kept_per_layer"]), 1)
        median = statistics.median(steps)
        baseline: dict[str, Any] = {}
        if cache is None and method.name == "full" and not method.config:  # after the bytes: it adds tokens
            theirs: list[float] = []
            with torch.inference_mode():
                decode_steps(model, token, kv, p.warmup + p.decode_tokens, theirs)
            ms = statistics.median(1000 * t for t in theirs[p.warmup:])
            baseline = {"transformers_decode_ms_per_token": ms, "decode_speedup_vs_transformers": ms / median}
        return {
            "score": median,
            "decode_ms_per_token": median,
            "decode_ms_mean": statistics.fmean(steps),
            "decode_ms_min": min(steps),
            "prefill_seconds": prefill,
            "kv_bytes": held,
            "kv_bytes_after_prefill": held_after_prefill,
            "kv_full_bytes": full,
            "kv_full_over_held": full / held if held else None,
            "kv_kept_mean": kept,
            "context_tokens": int(ids.shape[1]),
            "decode_tokens": p.decode_tokens,
            "threads": torch.get_num_threads(),
            **baseline,
        }


def decode_steps(model: Any, token: Any, kv: Any, n: int, times: list[float]) -> Any:
    """``n`` greedy decode steps from ``token`` (B, 1) on cache ``kv``; appends each
    step's seconds to ``times``; returns the last token."""
    for _ in range(n):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=kv, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
    return token
