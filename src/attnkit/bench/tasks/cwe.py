"""Common-words extraction, RULER's first aggregation task (Hsieh et al. 2024, arXiv 2404.06654).

A numbered list of words "1. word 2. word ..." where ``common_words`` (10) words appear
``common_repeats`` (30) times each and every other word ``uncommon_repeats`` (3) times,
shuffled; the question asks for the 10 most common words. As many uncommon words as fit
``length`` tokens. As in RULER, a shorter worked example (question and its answer) comes
first, and below 4096 tokens RULER's short setting applies: common words 6 times, the
others once, and a smaller example (20 words, 3 and 1 times). Score: RULER's
``string_match_all``, the share of the common words found in the greedy answer.

Deliberate deviations from RULER:

- words: RULER samples the English nouns, adjectives and verbs of the package wonderwords,
  not a dependency of attnkit; ``english_words()`` is a vocabulary built offline from
  the texts on the machine (the license texts of ``/usr/share/common-licenses`` and
  Python's ``pydoc_data.topics``): lowercase words of 4-10 letters in running text, minus
  words written as code, function words and the words of the prompt. About 2,200 words:
  enough for ~45k tokens; beyond, the list stops growing and the prompt is shorter than
  ``length`` (RULER also caps the list at its vocabulary);
- ``length`` is the prompt alone, with the model's prompt template (RULER's length also
  counts the tokens to generate), as for every attnkit task;
- the worked example's words are disjoint from the list's (RULER draws them
  independently), so its answer cannot be copied as the list's;
- matching is whole-word and case-insensitive ('cat' does not match 'category'; RULER
  tests substrings);
- a chat model gets the text as one user turn and no answer prefix; a base model
  completes RULER's answer prefix after ``Answer:`` (``niah.generate``).
"""

from __future__ import annotations

import functools
import keyword
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import haystack
from ..spec import CacheRun, MethodSpec, TaskSpec
from .base import PASS_MARK, Case, Column, Context, Section, Task, case_seed, register_task
from .niah import generate, is_base_model, score, scored_answer

INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. "
               "Memorize the ones that appear most often.\n")
QUESTION = "Question: What are the {n} most common words in the above list?"
ANSWER_PREFIX = "The top {n} words that appear most often in the list are:"

SHORT_BELOW = 4096  # RULER's short setting below this length
SHORT_REPEATS = (6, 1)  # common, uncommon repeats of the list in the short setting
EXAMPLE_SHORT = (20, 3, 1)  # the worked example: words, common repeats, uncommon repeats
EXAMPLE_LONG = (40, 10, 3)

# Function words and the prompt's words are never list words: an answer's own phrasing
# must not match a word by chance.
STOP_WORDS = frozenset("""
about above after again against also although among another anyone anything because been before being below
between both cannot could does doing done down during each either else even ever every from further have having
hence here herein hereby hereof hereunder into itself just least less like many more most much must neither
none nothing often once only other others otherwise ours over same several shall should since some such than
that their them themselves then there thereby therefore thereof these they this those though through thus
together under unless until upon very were what whatever when whenever where whereas wherever whether which
while whom whose will with within without would your yours yourself
""".split())

_WORD = re.compile(r"(?<![\w'./-])[a-z]{4,10}(?![\w'(-])")
_CODE = re.compile(r"[*`\"_=()\[\]{}<>%]([a-z]{4,10})\b|\b([a-z]{4,10})[*`\"_=()\[\]{}<>%]")  # a word written as code


@functools.cache
def english_words() -> tuple[str, ...]:
    """The word vocabulary, sorted: lowercase words of 4-10 letters in the license texts
    (if present) and Python's reference topics, minus any word the texts ever write as
    code (next to ``*``, a quote, ``_``, ``=``, a bracket or ``%``), Python's keywords,
    ``STOP_WORDS`` and the words of the prompt. Deterministic for given texts."""
    try:
        texts = [haystack.license_text()]
    except FileNotFoundError:
        texts = []
    texts.append(haystack.pydoc_text())
    code = {a or b for text in texts for a, b in _CODE.findall(text)}
    banned = STOP_WORDS | code | set(keyword.kwlist) | words_of(INSTRUCTION, QUESTION, ANSWER_PREFIX, "Answer:")
    return tuple(sorted({w for text in texts for w in _WORD.findall(text)} - banned))


def words_of(*texts: str) -> frozenset[str]:
    """The lowercase words of ``texts``."""
    return frozenset(w.lower() for text in texts for w in re.findall(r"[A-Za-z]+", text))


@dataclass
class WordsSample:
    """A generated aggregation prompt: ``user_text`` (the task text), the ``answers``
    (words to find), RULER's ``answer_prefix`` (completed by base models) and
    ``list_words``, the number of words in the list or coded text."""

    user_text: str
    answers: list[str]
    answer_prefix: str
    list_words: int


def numbered(words: list[str]) -> str:
    """``"1. a 2. b ..."``."""
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def word_list(common: list[str], uncommon: list[str], common_repeats: int, uncommon_repeats: int,
              rng: random.Random) -> list[str]:
    """The words repeated as asked, shuffled by ``rng``."""
    words = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(words)
    return words


def largest_fitting(fits: Callable[[int], bool], hi: int) -> int:
    """The largest ``n`` in 0..hi with ``fits(n)`` by bisection (``fits`` is taken as
    monotone); -1 if not even ``fits(0)``."""
    if not fits(0):
        return -1
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def make_sample(tokenizer: Any, length: int, seed: int, common_words: int = 10, common_repeats: int = 30,
                uncommon_repeats: int = 3, template: Callable[[str], str] = lambda s: s) -> WordsSample:
    """A seeded cwe prompt of at most ``length`` tokens (counted with ``template``
    applied), the largest such; ``answers`` = the common words. Deterministic per
    arguments; a ValueError if not even the example and the common words fit."""
    short = length < SHORT_BELOW
    cw_rep, ucw_rep = SHORT_REPEATS if short else (common_repeats, uncommon_repeats)
    ex_words, ex_cw_rep, ex_ucw_rep = EXAMPLE_SHORT if short else EXAMPLE_LONG
    rng = random.Random(seed)
    order = rng.sample(english_words(), len(english_words()))  # a seeded permutation of the vocabulary
    ex_common, ex_uncommon = order[:common_words], order[common_words:ex_words]
    common, pool = order[ex_words:ex_words + common_words], order[ex_words + common_words:]
    example = word_list(ex_common, ex_uncommon, ex_cw_rep, ex_ucw_rep, rng)
    prefix = ANSWER_PREFIX.format(n=common_words)
    head = (f"{INSTRUCTION}{numbered(example)}\n{QUESTION.format(n=common_words)} Answer: {prefix} "
            f"{numbered(ex_common)}\n")

    def text(n: int) -> tuple[str, int]:
        words = word_list(common, pool[:n], cw_rep, ucw_rep, random.Random(case_seed(seed, n)))
        return f"{head}{INSTRUCTION}{numbered(words)}\n{QUESTION.format(n=common_words)}", len(words)

    def fits(n: int) -> bool:
        return len(haystack.encode(tokenizer, template(text(n)[0]))) <= length

    n = largest_fitting(fits, len(pool))
    if n < 0:
        raise ValueError(f"cwe: length {length} is too short for the worked example and {common_words} common "
                         f"words repeated {cw_rep} times")
    user_text, count = text(n)
    return WordsSample(user_text, list(common), prefix, count)


def prompt_template(ctx: Context, answer_prefix: str) -> Callable[[str], str]:
    """The whole prompt the model gets for a user text: the chat template, and for a base
    model the answer prefix ``niah.generate`` adds (so the length counts it too)."""
    if is_base_model(ctx):
        return lambda s: ctx.lm.chat_prompt(s) + " " + answer_prefix
    return ctx.lm.chat_prompt


def score_words(answers: list[str], answer: str) -> float:
    """RULER's ``string_match_all`` with whole-word, case-insensitive matching: the share
    of ``answers`` found in ``answer``."""
    return score([a.lower() for a in answers], answer.lower())


def word_metrics(result: dict[str, Any], s: WordsSample) -> dict[str, Any]:
    """The metrics of one answer (``result`` from ``niah.generate``)."""
    return {**scored_answer(result, s.answers, score_words(s.answers, result["answer"])), "list_words": s.list_words}


def positive_ints(task: str, params: Any, names: tuple[str, ...]) -> None:
    """A ValueError naming the first of ``names`` that is not an integer >= 1."""
    for name in names:
        value = getattr(params, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"tasks.{task}.{name}: must be an integer >= 1, got {value!r}")


AGGREGATION_SECTION = Section(
    title="RULER aggregation (cwe, fwe)", layout="table", figures=("vs_length",), order=20,
    intro="Share of the most frequent words found in the greedy answer: the 10 words repeated most often in a "
          "numbered list (cwe), and the three most frequent coded words of a text whose word counts follow a "
          "Zipf law (fwe). The answer depends on the whole context, so a method that drops part of it "
          "miscounts.",
    columns=(Column("accuracy", "accuracy"), Column("prompt_tokens", "prompt tokens", 5)))


@register_task("cwe")
class CommonWords(Task):
    uses_cache = True
    score_name = "accuracy"
    pass_mark = PASS_MARK
    section = AGGREGATION_SECTION

    @dataclass
    class Params:
        """``common_repeats`` / ``uncommon_repeats`` apply from 4096 tokens on (below:
        RULER's short setting, 6 and 1)."""

        common_words: int = 10
        common_repeats: int = 30
        uncommon_repeats: int = 3
        new_tokens: int = 120

        def check(self) -> None:
            positive_ints("cwe", self, ("common_words", "common_repeats", "uncommon_repeats", "new_tokens"))
            if self.common_words >= EXAMPLE_SHORT[0]:
                raise ValueError(f"tasks.cwe.common_words: must be below {EXAMPLE_SHORT[0]} (the worked example "
                                 f"has {EXAMPLE_SHORT[0]} words), got {self.common_words}")
            if self.common_repeats <= self.uncommon_repeats:
                raise ValueError(f"tasks.cwe.common_repeats: must exceed uncommon_repeats "
                                 f"({self.uncommon_repeats}), got {self.common_repeats}")

    def measure(self, ctx: Context, case: Case, method: MethodSpec, spec: TaskSpec,
                cache: CacheRun | None = None) -> dict[str, Any]:
        p = spec.params
        key = ("cwe", case)
        if key not in ctx.memo:
            template = prompt_template(ctx, ANSWER_PREFIX.format(n=p.common_words))
            ctx.memo[key] = make_sample(ctx.lm.tokenizer, case.length, case.seed, p.common_words, p.common_repeats,
                                        p.uncommon_repeats, template=template)
        s = ctx.memo[key]
        result = generate(ctx, method, s.user_text, p.new_tokens, cache, answer_prefix=s.answer_prefix)
        return word_metrics(result, s)
