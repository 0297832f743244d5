"""RULER's eight NIAH tasks (niah variants niah_single_1 ... niah_multiquery), checked
against RULER's definitions by reading the generated prompt back independently."""

from __future__ import annotations

import re

import pytest

from attnkit.bench import haystack
from attnkit.bench.tasks import niah, variable_tracking
from attnkit.bench.tasks.niah_ruler import RECIPES

NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

# RULER's table: (haystack, key kind, value kind, keys, values per key, keys asked)
RULER = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needles", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needles", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
}


@pytest.fixture()
def tok():
    return haystack.WordTokenizer()


def needles_of(text: str) -> list[tuple[str, str, str]]:
    """(value kind, key, value) of every needle sentence in ``text``."""
    return NEEDLE.findall(text)


def asked_keys(question: str) -> list[str]:
    keys = re.search(r"for (.+) mentioned in the provided text\?$", question).group(1)
    return [k.strip() for k in re.split(r",\s*(?:and\s+)?|\s+and\s+", keys) if k.strip()]


def test_variants_are_rulers_eight():
    assert set(RECIPES) == set(RULER)
    p = niah.NIAH.Params(variants=["ruler"])
    p.check()
    assert p.variants == list(RECIPES)


@pytest.mark.parametrize("variant", sorted(RULER))
@pytest.mark.parametrize("length", [1500, 6000])
def test_ruler_niah_prompt(tok, variant, length):
    hay, key_kind, value_kind, n_keys, n_values, n_asked = RULER[variant]
    s = niah.make_sample(tok, length, 0.5, seed=11, variant=variant)
    question = s.user_text.rsplit("\n\n", 1)[1]
    keys = asked_keys(question)
    assert len(keys) == n_asked
    found = needles_of(s.user_text)
    by_key: dict[str, list[str]] = {}
    for kind, key, value in found:
        assert kind == value_kind
        by_key.setdefault(key, []).append(value)
    # the asked keys' values are exactly the answers, each key with n_values values
    assert sorted(v for k in keys for v in by_key[k]) == sorted(s.answers)
    assert all(len(by_key[k]) == n_values for k in keys)
    for value in s.answers:
        assert UUID.match(value) if value_kind == "uuids" else re.fullmatch(r"\d{7}", value)
    for key in by_key:
        assert UUID.match(key) if key_kind == "uuids" else re.fullmatch(r"[a-z]+-[a-z]+", key)
    if hay == "needles":  # the haystack is other needles: many distinct keys, each once
        assert len(by_key) > 20 and all(len(v) == 1 for v in by_key.values())
    else:
        assert len(by_key) == n_keys
        assert ("The grass is green." in s.user_text) == (hay == "noise")
    # singular where one value is asked, as RULER
    one = n_asked * n_values == 1
    assert s.user_text.startswith("A special magic" if one else "Some special magic")
    assert question.startswith("What is the" if one else "What are all the")
    assert s.answer_prefix == f"The special magic {value_kind[:-1] if one else value_kind} for " \
        f"{question.split(' for ', 1)[1].removesuffix(' mentioned in the provided text?')} " \
        f"mentioned in the provided text {'is' if one else 'are'}"
    n = len(tok.encode(s.user_text + " " + s.answer_prefix))
    assert 0.93 * length <= n <= length


@pytest.mark.parametrize("variant", sorted(RULER))
def test_ruler_niah_first_asked_needle_at_depth_and_seeded(tok, variant):
    for depth in (0.1, 0.6):
        s = niah.make_sample(tok, 3000, depth, seed=5, variant=variant)
        before = len(tok.encode(s.user_text[: s.offsets[0]]))
        total = len(tok.encode(s.user_text[: s.context_chars]))
        assert abs(before / total - depth) < 0.06
        assert s.answers[0] in s.needles[0]
    again = niah.make_sample(haystack.WordTokenizer(), 3000, 0.6, seed=5, variant=variant)
    other = niah.make_sample(tok, 3000, 0.6, seed=6, variant=variant)
    assert again.user_text == s.user_text and other.answers != s.answers


def test_ruler_scoring_is_string_match_all():
    assert niah.score(["1234567", "7654321"], "They are 1234567 and 7654321.") == 1.0
    assert niah.score(["1234567", "7654321"], "1234567") == 0.5
    assert niah.score(["1234567"], "12345678") == 0.0  # whole numbers, not substrings
    u = "d23f0824-128b-4f33-8c5c-7fd0a6a3a450"
    assert niah.score([u], f"is: {u}.") == 1.0 and niah.score([u], u[:-1]) == 0.0


def test_answer_tokens_cover_uuids_and_several_values(tok):
    single = niah.make_sample(tok, 800, 0.5, seed=1, variant="niah_single_1")
    uuids = niah.make_sample(tok, 800, 0.5, seed=1, variant="niah_single_3")
    multi = niah.make_sample(tok, 800, 0.5, seed=1, variant="niah_multivalue")
    assert niah.answer_tokens(single, 24) == 24
    assert niah.answer_tokens(uuids, 24) >= 40
    assert niah.answer_tokens(multi, 24) >= 4 * 12


def test_variable_tracking_answer_prefix_for_base_models(tok):
    chat = variable_tracking.make_sample(tok, 1000, 0.3, seed=2)
    base = variable_tracking.make_sample(tok, 1000, 0.3, seed=2, base_model=True)
    assert chat.user_text.endswith("they are:") and not chat.answer_prefix
    assert base.user_text.endswith("in the text above.") and base.answer_prefix.endswith("they are:")
    assert base.answers == chat.answers
