"""RULER's eight needle-in-a-haystack tasks (Hsieh et al. 2024, "RULER: What's the Real
Context Size of Your Long-Context Language Models?", arXiv 2404.06654), as ``niah``
variants named like RULER's tasks:

===================  =========  ======  =======  =====================================
variant              haystack   key     value    needles
===================  =========  ======  =======  =====================================
``niah_single_1``    noise      words   numbers  1
``niah_single_2``    essay      words   numbers  1
``niah_single_3``    essay      words   uuids    1
``niah_multikey_1``  essay      words   numbers  4 keys, 1 asked
``niah_multikey_2``  needles    words   numbers  1 (the haystack is other needles)
``niah_multikey_3``  needles    uuids   uuids    1 (the haystack is other needles)
``niah_multivalue``  essay      words   numbers  1 key with 4 values, all asked
``niah_multiquery``  essay      words   numbers  4 keys, all 4 asked
===================  =========  ======  =======  =====================================

As RULER: the needle "One of the special magic {numbers|uuids} for {key} is: {value}.",
7-digit numbers, uuid4 values, the instruction before the context ("Some special magic
numbers are hidden within the following text. Make sure to memorize it. I will quiz you
about the numbers afterwards."; singular where one value is asked), the question "What
are all the special magic numbers for {keys} mentioned in the provided text?" and, for
base models, the answer prefix "The special magic numbers for {keys} mentioned in the
provided text are". Scored by RULER's string_match_all (share of the values found).

Deliberate deviations: the essay haystack is the license texts on the machine (RULER's
Paul Graham essays are not offline); word keys are ``word-word`` pairs from
``haystack.vocabulary()`` (RULER: wonderwords' adjective-noun pairs); the first asked
needle sits at the case's depth and the others at seeded random depths (RULER draws all
depths at random), so accuracy can be read by depth; a blank line (not a newline)
separates the context from the question.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from .. import haystack


@dataclass(frozen=True)
class Recipe:
    """One RULER NIAH task: its haystack ("noise", "essay" or "needles"), the kind of keys
    ("words", "uuids") and values ("numbers", "uuids"), and RULER's num_needle_k / _v / _q."""

    haystack: str
    key: str
    value: str
    keys: int = 1
    values: int = 1
    queries: int = 1


RECIPES: dict[str, Recipe] = {
    "niah_single_1": Recipe("noise", "words", "numbers"),
    "niah_single_2": Recipe("essay", "words", "numbers"),
    "niah_single_3": Recipe("essay", "words", "uuids"),
    "niah_multikey_1": Recipe("essay", "words", "numbers", keys=4),
    "niah_multikey_2": Recipe("needles", "words", "numbers"),
    "niah_multikey_3": Recipe("needles", "uuids", "uuids"),
    "niah_multivalue": Recipe("essay", "words", "numbers", values=4),
    "niah_multiquery": Recipe("essay", "words", "numbers", keys=4, queries=4),
}

ESSAY = "licenses"  # the haystack kind standing in for RULER's essays


@dataclass
class Prompt:
    """What ``niah.build`` needs: needles with their depths (the asked one first), the
    instruction before the context, the question, the answers and the answer prefix;
    ``filler(tokenizer, n_tokens)`` makes the haystack (None: a ``haystack`` kind)."""

    placed: list[tuple[float, str]]
    preamble: str
    question: str
    answers: list[str]
    answer_prefix: str
    kind: str
    filler: Callable[[Any, int], str] | None = None


def random_key(rng: random.Random, kind: str) -> str:
    """A needle key: ``word-word`` from the vocabulary, or a uuid."""
    if kind == "uuids":
        return random_uuid(rng)
    words = haystack.vocabulary()
    return f"{rng.choice(words)}-{rng.choice(words)}"


def random_value(rng: random.Random, kind: str) -> str:
    """A needle value: a 7-digit number (as RULER) or a uuid."""
    return random_uuid(rng) if kind == "uuids" else str(rng.randint(1_000_000, 9_999_999))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def needle(recipe: Recipe, key: str, value: str) -> str:
    return f"One of the special magic {recipe.value} for {key} is: {value}."


def distinct_keys(rng: random.Random, kind: str, n: int, avoid: set[str] = frozenset()) -> list[str]:
    """``n`` different keys, none in ``avoid``."""
    keys: list[str] = []
    while len(keys) < n:
        key = random_key(rng, kind)
        if key not in avoid and key not in keys:
            keys.append(key)
    return keys


def make_prompt(variant: str, depth: float, seed: int) -> Prompt:
    """The needles, question and answers of RULER task ``variant`` (a key of RECIPES),
    the first asked needle at ``depth``; deterministic per arguments."""
    recipe = RECIPES[variant]
    rng = random.Random(seed)
    keys = distinct_keys(rng, recipe.key, recipe.keys)
    values = [[random_value(rng, recipe.value) for _ in range(recipe.values)] for _ in keys]
    asked = sorted(rng.sample(range(recipe.keys), recipe.queries))
    order = [(k, v) for k in asked for v in range(recipe.values)]
    order += [(k, v) for k in range(recipe.keys) if k not in asked for v in range(recipe.values)]
    placed = [(depth if i == 0 else rng.random(), needle(recipe, keys[k], values[k][v]))
              for i, (k, v) in enumerate(order)]
    query = ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]] if len(asked) > 1 else keys[asked[0]]
    one = recipe.queries * recipe.values == 1
    noun = recipe.value[:-1] if one else recipe.value
    preamble = (f"{'A' if one else 'Some'} special magic {noun} {'is' if one else 'are'} hidden within the "
                f"following text. Make sure to memorize it. I will quiz you about the {noun} afterwards.\n")
    question = f"What {'is' if one else 'are all'} the special magic {noun} for {query} mentioned in the provided text?"
    prefix = f"The special magic {noun} for {query} mentioned in the provided text {'is' if one else 'are'}"
    answers = [values[k][v] for k in asked for v in range(recipe.values)]
    filler = None
    if recipe.haystack == "needles":
        filler = needle_filler(recipe, seed, avoid=set(keys))
    kind = "noise" if recipe.haystack == "noise" else ESSAY
    return Prompt(placed, preamble, question, answers, prefix, kind, filler)


def needle_filler(recipe: Recipe, seed: int, avoid: set[str]) -> Callable[[Any, int], str]:
    """RULER's "needle" haystack: about ``n_tokens`` tokens of distractor needles (other
    keys, other values), whole sentences only."""

    def fill(tokenizer: Any, n_tokens: int) -> str:
        rng = random.Random(seed ^ 0x5EED)
        taken = set(avoid)
        sentences: list[str] = []
        used = 0
        while True:
            key = distinct_keys(rng, recipe.key, 1, taken)[0]
            taken.add(key)
            sentence = needle(recipe, key, random_value(rng, recipe.value))
            cost = len(haystack.encode(tokenizer, " " + sentence))
            if used + cost > n_tokens:
                return " ".join(sentences)
            sentences.append(sentence)
            used += cost

    return fill
