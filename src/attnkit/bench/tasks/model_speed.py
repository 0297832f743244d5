"""Model-level speed and memory: prefill seconds for ``length`` tokens of real text with
the method on every layer, decode milliseconds per token after it (exact attention over
the cache unless a cache policy says otherwise), and the KV-cache bytes held after the
prefill. A short warm-up forward runs once per method before the first measurement."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..spec import MethodSpec, TaskSpec
from .base import Case, Context, Section, Task, register_task
from .perplexity import token_ids


def cache_bytes(cache: Any) -> int:
    """Bytes of the key/value tensors a transformers Cache holds (all layers)."""
    import torch

    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for name in ("key_cache", "value_cache"):
        for t in getattr(cache, name, []) or []:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@register_task("model_speed")
class ModelSpeed(Task):
    """Prefill and decode timings of the patched model; with ``baseline`` (default), the
    ``full`` row also times the unpatched model (transformers' own attention) on the same
    tokens in the same run, and reports the ratio and the largest last-token logit
    difference (window layers run attnkit's kernel under ``full``: docs/architectures.md)."""

    score_name = "prefill_seconds"
    higher_is_better = False
    section = Section(title="Model speed and memory", layout="speed", figures=("vs_length",), order=40)

    @dataclass
    class Params:
        decode_tokens: int = 16
        repeats: int = 1  # timed prefills per row (median reported, min / max kept)
        baseline: bool = True  # the full row also times transformers' own attention

        def check(self) -> None:
            for name in ("decode_tokens", "repeats"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"tasks.model_speed.{name}: must be an integer >= 1, got {value!r}")
            if not isinstance(self.baseline, bool):
                raise ValueError(f"tasks.model_speed.baseline: must be true or false, got {self.baseline!r}")

    def measure(self, ctx: Context, case: Case, method: MethodSpec, spec: TaskSpec) -> dict[str, Any]:
        import torch

        from ... import patching

        lm, model = ctx.lm, ctx.lm.model
        ids = torch.tensor([token_ids(lm.tokenizer, case.length, case.seed)])
        params = spec.params
        with patching.patch(model, prefill=method.name, **method.kwargs):
            row, logits = _timed(ctx, model, ids, params.repeats, params.decode_tokens, ("warm", method))
        if params.baseline and method.name == "full" and not method.kwargs:
            base, base_logits = _timed(ctx, model, ids, params.repeats, params.decode_tokens, ("warm", "transformers"))
            row.update({f"transformers_{name}": value for name, value in base.items() if name != "threads"})
            row["prefill_speedup_vs_transformers"] = base["prefill_seconds"] / row["prefill_seconds"]
            row["decode_speedup_vs_transformers"] = base["decode_ms_per_token"] / row["decode_ms_per_token"]
            row["max_abs_logit_diff_vs_transformers"] = (logits - base_logits).abs().max().item()
        return row


def _timed(ctx: Context, model: Any, ids: Any, repeats: int, decode_tokens: int, warm_key: Any) -> tuple[dict, Any]:
    """(timings, last-token logits (1, V)) of ``repeats`` prefills of ``ids`` (1, N) and
    ``decode_tokens`` greedy decode steps after the last one, with the model as it is."""
    import statistics

    import torch

    with torch.inference_mode():
        if warm_key not in ctx.memo:
            model(input_ids=ids[:, :64], use_cache=True, logits_to_keep=1)
            ctx.memo[warm_key] = True
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
        prefill = statistics.median(times)
        logits = out.logits[:, -1].float()
        cache = out.past_key_values
        kv = cache_bytes(cache)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - start
    row = {
        "score": prefill,
        "prefill_seconds": prefill,
        "prefill_seconds_min": min(times),
        "prefill_seconds_max": max(times),
        "prefill_tokens_per_second": ids.shape[1] / prefill,
        "decode_ms_per_token": 1000 * decode / decode_tokens,
        "kv_cache_bytes": kv,
        "threads": torch.get_num_threads(),
    }
    return row, logits
