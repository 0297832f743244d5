"""Task generators: seeded, deterministic, needles at the requested depth; scoring."""

from __future__ import annotations

import pytest

from attnkit.bench import haystack
from attnkit.bench.tasks import case_seed, niah, passkey, variable_tracking


@pytest.fixture()
def tok():
    return haystack.WordTokenizer()


@pytest.mark.parametrize("variant", niah.VARIANTS)
@pytest.mark.parametrize("kind", haystack.KINDS)
def test_niah_deterministic_per_seed(tok, variant, kind):
    a = niah.make_sample(tok, 600, 0.4, seed=7, variant=variant, kind=kind)
    b = niah.make_sample(haystack.WordTokenizer(), 600, 0.4, seed=7, variant=variant, kind=kind)
    c = niah.make_sample(tok, 600, 0.4, seed=8, variant=variant, kind=kind)
    assert a.user_text == b.user_text and a.answers == b.answers
    assert a.answers != c.answers
    for needle, offset in zip(a.needles, a.offsets):
        assert a.user_text[offset:offset + len(needle)] == needle
    for value in a.answers:
        assert value in a.user_text


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("length", [300, 2000])
def test_needle_at_requested_depth(tok, depth, length):
    s = niah.make_sample(tok, length, depth, seed=3, variant="single")
    # Depth in tokens of the haystack: tokens before the needle / haystack tokens.
    before = len(tok.encode(s.user_text[: s.offsets[0]]))
    total = len(tok.encode(s.user_text[: s.context_chars]))
    assert abs(before / total - depth) < 0.06, (before, total)
    assert abs(len(tok.encode(s.user_text)) - length) <= 0.05 * length


def test_prompt_length_counts_template(tok):
    wrapped = niah.make_sample(tok, 500, 0.5, seed=1, template=lambda s: "a b c d e f g h i j " + s)
    plain = niah.make_sample(tok, 500, 0.5, seed=1)
    assert len(tok.encode(wrapped.user_text)) == pytest.approx(len(tok.encode(plain.user_text)) - 10, abs=3)


def test_multi_variants_place_first_asked_needle_at_depth(tok):
    for variant in ("multikey", "multivalue", "multiquery"):
        s = niah.make_sample(tok, 1500, 0.2, seed=5, variant=variant, needles=4, queries=2)
        assert len(s.needles) == 4
        assert abs(s.offsets[0] / s.context_chars - 0.2) < 0.06
        expected = {"multikey": 1, "multivalue": 4, "multiquery": 2}[variant]
        assert len(s.answers) == expected


def test_passkey_and_variable_tracking(tok):
    p = passkey.make_sample(tok, 400, 0.5, seed=2)
    assert p.user_text == passkey.make_sample(haystack.WordTokenizer(), 400, 0.5, seed=2).user_text
    assert p.answers[0] in p.needles[0] and abs(p.offsets[0] / p.context_chars - 0.5) < 0.1
    v = variable_tracking.make_sample(tok, 600, 0.2, seed=2, hops=3)
    assert len(v.answers) == 4 and len(set(v.answers)) == 4
    offsets = v.offsets
    assert offsets == sorted(offsets)  # the chain runs forward through the text
    assert f"VAR {v.answers[1]} = VAR {v.answers[0]}." in v.user_text


def test_real_text_haystack():
    try:
        text = haystack.license_text()
    except FileNotFoundError:
        pytest.skip("no /usr/share/common-licenses on this machine")
    assert "GNU GENERAL PUBLIC LICENSE" in text and len(text) > 30000
    ctx = haystack.context(haystack.WordTokenizer(), 5000, seed=1)
    assert 4800 < len(ctx.split()) <= 5000
    assert ctx != haystack.context(haystack.WordTokenizer(), 5000, seed=2)


def test_insert_keeps_text():
    text = "One. Two. Three. Four."
    out, offsets = haystack.insert(text, [(1.0, "END."), (0.0, "START."), (0.5, "MID.")])
    assert out.startswith("START.") and out.rstrip().endswith("END.")
    assert out.replace("START. ", "").replace("MID. ", "").replace(" END.", "").strip() == text
    assert [out[o:o + 3] for o in offsets] == ["END", "STA", "MID"]
    with pytest.raises(ValueError, match="depth"):
        haystack.insert(text, [(1.5, "x")])


@pytest.mark.parametrize(("answers", "answer", "expected"), [
    (["58213"], "The special magic number mentioned in the text above is 58213.", 1.0),
    (["58213"], "The number is 582130.", 0.0),
    (["58213"], "It is 158213", 0.0),
    (["58213"], "58213", 1.0),
    (["11111", "22222"], "11111 and 33333", 0.5),
    (["ABCDE", "FGHIJ"], "they are: ABCDE, FGHIJK", 0.5),
    ([], "anything", 0.0),
])
def test_score(answers, answer, expected):
    assert niah.score(answers, answer) == expected


def test_case_seed_is_stable():
    assert case_seed(0, "niah", "single", 2048, 0.5, 0) == case_seed(0, "niah", "single", 2048, 0.5, 0)
    assert case_seed(0, "niah", "single", 2048, 0.5, 0) != case_seed(0, "niah", "single", 2048, 0.5, 1)
    assert case_seed(1, "x") == 1371052745 or isinstance(case_seed(1, "x"), int)


def test_answer_prefix_for_base_models(tok):
    """A base model (no chat template) completes RULER's answer prefix after "Answer:"."""
    assert niah.derive_answer_prefix("What is the special magic number mentioned in the text above?") == \
        "The special magic number mentioned in the text above is"
    assert niah.derive_answer_prefix("What are all the special magic numbers for red-fox mentioned in the text above?") == \
        "The special magic numbers for red-fox mentioned in the text above are"
    assert niah.derive_answer_prefix("Which license is this?") == ""
    for variant in niah.VARIANTS:
        sample = niah.make_sample(tok, 600, 0.5, 0, variant)
        assert niah.derive_answer_prefix(sample.user_text.rsplit("\n\n", 1)[-1]), variant
