"""Perplexity of long real text: one forward pass of ``length`` tokens with the method on
every layer's prefill; token-level perplexity overall and per half (the second half
is where a local pattern loses the most context)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from .. import haystack
from ..spec import MethodSpec, TaskSpec
from .base import Case, Column, Context, Section, Task, register_task


def token_ids(tokenizer: Any, length: int, seed: int, kind: str = "licenses") -> list[int]:
    """``length`` token ids of real text from a seeded starting sentence."""
    text = haystack.context(tokenizer, length + 64, seed=seed, kind=kind)
    ids = haystack.encode(tokenizer, text)
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


def token_nll(model: Any, input_ids: Any, chunk: int = 512) -> Any:
    """Per-token negative log-likelihood (N - 1,) of ``input_ids`` (1, N), the LM head
    applied in row chunks so (N, vocab) logits are never held at once."""
    import torch
    import torch.nn.functional as F

    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[0]  # (N, d)
    head = model.get_output_embeddings()
    out = []
    for start in range(0, hidden.shape[0] - 1, chunk):
        stop = min(start + chunk, hidden.shape[0] - 1)
        logits = head(hidden[start:stop]).float()
        out.append(F.cross_entropy(logits, input_ids[0, start + 1: stop + 1], reduction="none"))
    return torch.cat(out)


@register_task("perplexity")
class Perplexity(Task):
    score_name = "perplexity"
    higher_is_better = False
    section = Section(
        title="Perplexity", table_title="Token-level perplexity of real text (lower is better)", variant_header="text",
        columns=(Column("perplexity", "perplexity", 4), Column("perplexity_first_half", "first half", 4),
                 Column("perplexity_second_half", "second half", 4)), order=30)

    @dataclass
    class Params:
        haystack: str = "licenses"

        def check(self) -> None:
            if self.haystack not in haystack.KINDS:
                raise ValueError(f"tasks.perplexity.haystack: unknown {self.haystack!r}; "
                                 f"allowed: {', '.join(haystack.KINDS)}")

    def variants(self, spec: TaskSpec) -> list[str]:
        return [spec.params.haystack]

    def measure(self, ctx: Context, case: Case, method: MethodSpec, spec: TaskSpec) -> dict[str, Any]:
        import torch

        from ... import patching

        lm = ctx.lm
        ids = torch.tensor([token_ids(lm.tokenizer, case.length, case.seed, case.variant)])
        start = time.perf_counter()
        with torch.inference_mode(), patching.patch(lm.model, prefill=method.name, **method.kwargs):
            nll = token_nll(lm.model, ids)
        seconds = time.perf_counter() - start
        half = nll.shape[0] // 2
        ppl = math.exp(nll.mean().item())
        return {
            "score": ppl,
            "perplexity": ppl,
            "perplexity_first_half": math.exp(nll[:half].mean().item()),
            "perplexity_second_half": math.exp(nll[half:].mean().item()),
            "tokens": int(ids.shape[1]),
            "forward_seconds": seconds,
        }
