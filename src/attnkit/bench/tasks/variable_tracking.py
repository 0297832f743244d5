"""Variable tracking, RULER's multi-hop task (Hsieh et al. 2024, arXiv 2404.06654).

A chain ``VAR ABCDE = 41234``, ``VAR FGHIJ = VAR ABCDE``, ... (``hops`` assignments
after the first) is scattered through filler text: the first assignment at the case's
depth, the others spread evenly from there to the end. The question asks for every
variable that holds the value; score = share of the chain's names in the answer.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any, Callable

from .. import haystack
from ..spec import CacheRun, MethodSpec, TaskSpec
from .base import PASS_MARK, Case, Context, Task, register_task
from .niah import RETRIEVAL_SECTION, Sample, answer_metrics, build, generate, is_base_model

PREAMBLE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")


def make_sample(tokenizer: Any, length: int, depth: float, seed: int, hops: int = 4, kind: str = "noise",
                template: Callable[[str], str] = lambda s: s, base_model: bool = False) -> Sample:
    """A seeded variable-tracking prompt of about ``length`` tokens; ``answers`` = the chain.

    A chat model reads RULER's answer start inside the question; for a base model
    (``base_model``) it is the Sample's ``answer_prefix``, completed after "Answer:"."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = [depth + (1 - depth) * i / (hops + 1) for i in range(hops + 1)]
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (f"According to the chain(s) of variable assignment in the text above, "
              f"{hops + 1} variables are assigned the value {value}, they are:")
    if not base_model:
        question, prefix = f"{question} Answer: {prefix}", ""
    return build(tokenizer, length, seed, kind, list(zip(depths, statements)), question, names, template,
                 preamble=PREAMBLE, answer_prefix=prefix)


@register_task("variable_tracking")
class VariableTracking(Task):
    uses_depth = True
    uses_cache = True
    score_name = "accuracy"
    pass_mark = PASS_MARK
    section = RETRIEVAL_SECTION

    @dataclass
    class Params:
        hops: int = 4
        haystack: str = "noise"
        new_tokens: int = 40

        def check(self) -> None:
            if self.haystack not in haystack.KINDS:
                raise ValueError(f"tasks.variable_tracking.haystack: unknown {self.haystack!r}; "
                                 f"allowed: {', '.join(haystack.KINDS)}")
            for name in ("hops", "new_tokens"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"tasks.variable_tracking.{name}: must be an integer >= 1, got {value!r}")

    def measure(self, ctx: Context, case: Case, method: MethodSpec, spec: TaskSpec,
                cache: CacheRun | None = None) -> dict[str, Any]:
        key = ("vt", case)
        if key not in ctx.memo:
            ctx.memo[key] = make_sample(ctx.lm.tokenizer, case.length, case.depth or 0.0, case.seed,
                                        spec.params.hops, spec.params.haystack, template=ctx.lm.chat_prompt,
                                        base_model=is_base_model(ctx))
        s = ctx.memo[key]
        return answer_metrics(ctx, generate(ctx, method, s.user_text, spec.params.new_tokens, cache,
                                            s.answer_prefix), s)
