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
    score_name = "prefill_seconds"
    higher_is_better = False
    section = Section(title="Model speed and memory", layout="speed", figures=("vs_length",), order=40)

    @dataclass
    class Params:
        decode_tokens: int = 16

        def check(self) -> None:
            value = self.decode_tokens
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tasks.model_speed.decode_tokens: must be an integer >= 1, got {value!r}")

    def measure(self, ctx: Context, case: Case, method: MethodSpec, spec: TaskSpec) -> dict[str, Any]:
        import torch

        from ... import patching

        lm, model = ctx.lm, ctx.lm.model
        ids = torch.tensor([token_ids(lm.tokenizer, case.length, case.seed)])
        with torch.inference_mode(), patching.patch(model, prefill=method.name, **method.kwargs):
            if ("warm", method) not in ctx.memo:
                model(input_ids=ids[:, :64], use_cache=True, logits_to_keep=1)
                ctx.memo[("warm", method)] = True
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - start
            cache = out.past_key_values
            kv = cache_bytes(cache)
            token = out.logits[:, -1:].argmax(-1)
            n = spec.params.decode_tokens
            start = time.perf_counter()
            for _ in range(n):
                out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1:].argmax(-1)
            decode = time.perf_counter() - start
        return {
            "score": prefill,
            "prefill_seconds": prefill,
            "prefill_tokens_per_second": case.length / prefill,
            "decode_ms_per_token": 1000 * decode / n,
            "kv_cache_bytes": kv,
            "threads": torch.get_num_threads(),
        }
