"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", arXiv 2305.16300).

A five-digit pass key hidden at a depth in filler text (repeated-essay noise by default,
or real license text), asked back at the end; scored by exact match of the key in the
greedy answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from .. import haystack
from ..spec import CacheRun, MethodSpec, TaskSpec
from .base import PASS_MARK, Case, Context, Task, register_task
from .niah import RETRIEVAL_SECTION, Sample, answer_metrics, build, generate

PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n\n")
QUESTION = "What is the pass key? The pass key is"


def make_sample(tokenizer: Any, length: int, depth: float, seed: int, kind: str = "noise",
                template: Callable[[str], str] = lambda s: s) -> Sample:
    """A seeded passkey prompt of about ``length`` tokens with the key at ``depth``."""
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return build(tokenizer, length, seed, kind, [(depth, needle)], QUESTION, [key], template, preamble=PREAMBLE)


@register_task("passkey")
class Passkey(Task):
    uses_depth = True
    uses_cache = True
    score_name = "accuracy"
    pass_mark = PASS_MARK
    section = RETRIEVAL_SECTION

    @dataclass
    class Params:
        haystack: str = "noise"
        new_tokens: int = 24

        def check(self) -> None:
            if self.haystack not in haystack.KINDS:
                raise ValueError(f"tasks.passkey.haystack: unknown {self.haystack!r}; "
                                 f"allowed: {', '.join(haystack.KINDS)}")
            if isinstance(self.new_tokens, bool) or not isinstance(self.new_tokens, int) or self.new_tokens < 1:
                raise ValueError(f"tasks.passkey.new_tokens: must be an integer >= 1, got {self.new_tokens!r}")

    def measure(self, ctx: Context, case: Case, method: MethodSpec, spec: TaskSpec,
                cache: CacheRun | None = None) -> dict[str, Any]:
        key = ("passkey", case)
        if key not in ctx.memo:
            ctx.memo[key] = make_sample(ctx.lm.tokenizer, case.length, case.depth or 0.0, case.seed,
                                        spec.params.haystack, template=ctx.lm.chat_prompt)
        s = ctx.memo[key]
        return answer_metrics(ctx, generate(ctx, method, s.user_text, spec.params.new_tokens, cache), s)
