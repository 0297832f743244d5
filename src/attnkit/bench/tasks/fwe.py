"""Frequent-words extraction, RULER's second aggregation task (Hsieh et al. 2024, arXiv 2404.06654).

A "coded text" of random lowercase words (``word_length`` letters; ``length // 50`` of
them, at least 5) where the word of rank k appears ``floor(n * k**-alpha / zeta(alpha))``
times (a Zipf law), shuffled; the rank-1 word is noise, the dots ``...``, which the
question says to ignore. The answer is the three coded words of ranks 2-4. ``n`` is the
largest that fits ``length`` tokens. Score: RULER's ``string_match_all``, the share of
the three words found in the greedy answer.

As in RULER's code, the noise is ``...`` while its question says ``'....'``. Deliberate
deviations from RULER: ``length`` is the prompt alone, with the model's prompt template;
``n`` is fitted by bisection (RULER steps by length/32); coded words never equal a word
of the prompt; matching is whole-word and case-insensitive; a chat model gets no answer
prefix (see ``cwe``).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import haystack
from ..spec import CacheRun, MethodSpec, TaskSpec
from .base import PASS_MARK, Case, Context, Task, case_seed, register_task
from .cwe import (AGGREGATION_SECTION, WordsSample, largest_fitting, positive_ints, prompt_template, word_metrics,
                  words_of)
from .niah import generate

INSTRUCTION = ("Read the following coded text and track the frequency of each coded word. "
               "Find the three most frequently appeared coded words. ")
QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?")
ANSWER_PREFIX = "According to the coded text above, the three most frequently appeared words are:"
NOISE = "..."  # the rank-1 "word"
MIN_VOCAB = 5


def zeta(alpha: float) -> float:
    """Riemann zeta(alpha) for alpha > 1: a partial sum and its Euler-Maclaurin tail."""
    n = 1000
    head = sum(k ** -alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + n ** -alpha / 2 + alpha * n ** (-alpha - 1) / 12


def zipf_counts(n: int, vocab: int, alpha: float) -> list[int]:
    """How often each of ``vocab`` ranked words appears: ``floor(n * k**-alpha / zeta(alpha))``."""
    z = zeta(alpha)
    return [int(n * k ** -alpha / z) for k in range(1, vocab + 1)]


def coded_words(rng: random.Random, count: int, word_length: int) -> list[str]:
    """``count`` distinct random lowercase words of ``word_length`` letters, none a prompt word."""
    banned = words_of(INSTRUCTION, QUESTION, ANSWER_PREFIX, "Answer:")
    words: list[str] = []
    while len(words) < count:
        w = "".join(rng.choices(string.ascii_lowercase, k=word_length))
        if w not in words and w not in banned:
            words.append(w)
    return words


def make_sample(tokenizer: Any, length: int, seed: int, alpha: float = 2.0, word_length: int = 6,
                template: Callable[[str], str] = lambda s: s) -> WordsSample:
    """A seeded fwe prompt of at most ``length`` tokens (counted with ``template``
    applied), the largest such; ``answers`` = the words of ranks 2-4. Deterministic per
    arguments; a ValueError if the length is too short for ranks 2-5 to differ."""
    vocab = [NOISE] + coded_words(random.Random(seed), max(length // 50, MIN_VOCAB) - 1, word_length)

    def text(n: int) -> tuple[str, int]:
        words = [w for w, c in zip(vocab, zipf_counts(n, len(vocab), alpha)) for _ in range(c)]
        random.Random(case_seed(seed, n)).shuffle(words)
        return f"{INSTRUCTION}{' '.join(words)}\n{QUESTION}", len(words)

    def fits(n: int) -> bool:
        return len(haystack.encode(tokenizer, template(text(n)[0]))) <= length

    n = largest_fitting(fits, int(length * zeta(alpha)) + 1)  # the noise alone is n / zeta(alpha) tokens
    counts = zipf_counts(max(n, 0), len(vocab), alpha)
    if n < 0 or not counts[1] > counts[2] > counts[3] > counts[4]:
        raise ValueError(f"fwe: length {length} is too short: the words of ranks 2-5 need distinct counts")
    user_text, total = text(n)
    return WordsSample(user_text, vocab[1:4], ANSWER_PREFIX, total)


@register_task("fwe")
class FrequentWords(Task):
    uses_cache = True
    score_name = "accuracy"
    pass_mark = PASS_MARK
    section = AGGREGATION_SECTION

    @dataclass
    class Params:
        alpha: float = 2.0
        word_length: int = 6
        new_tokens: int = 50

        def check(self) -> None:
            if isinstance(self.alpha, int) and not isinstance(self.alpha, bool):
                self.alpha = float(self.alpha)
            if not isinstance(self.alpha, float) or not self.alpha > 1.0:
                raise ValueError(f"tasks.fwe.alpha: must be a number > 1 (the Zipf exponent), got {self.alpha!r}")
            positive_ints("fwe", self, ("word_length", "new_tokens"))
            if self.word_length < 3:
                raise ValueError(f"tasks.fwe.word_length: must be at least 3 letters, got {self.word_length}")

    def measure(self, ctx: Context, case: Case, method: MethodSpec, spec: TaskSpec,
                cache: CacheRun | None = None) -> dict[str, Any]:
        p = spec.params
        key = ("fwe", case)
        if key not in ctx.memo:
            ctx.memo[key] = make_sample(ctx.lm.tokenizer, case.length, case.seed, p.alpha, p.word_length,
                                        template=prompt_template(ctx, ANSWER_PREFIX))
        s = ctx.memo[key]
        result = generate(ctx, method, s.user_text, p.new_tokens, cache, answer_prefix=s.answer_prefix)
        return word_metrics(result, s)
