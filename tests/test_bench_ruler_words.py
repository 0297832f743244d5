"""RULER's aggregation tasks cwe and fwe: prompt length, the answers checked by counting
the prompt's words independently, the Zipf counts, determinism, scoring, parameters, and
a tiny run on SmolLM2."""

from __future__ import annotations

import math
import re
from collections import Counter
from types import SimpleNamespace

import pytest

from attnkit.bench import build, report, runner
from attnkit.bench.store import Store
from attnkit.bench.tasks import TASKS, cwe, fwe


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2.tokenizer


def n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def cwe_lists(user_text: str) -> tuple[list[str], list[str], list[str]]:
    """(example list, example answer, list) parsed from a cwe prompt."""
    blocks = user_text.split("Memorize the ones that appear most often.\n")
    assert len(blocks) == 3  # the worked example, then the task
    example, answer = blocks[1].split("\nQuestion:")[0], blocks[1].split("are: ")[1]
    listed = blocks[2].split("\nQuestion:")[0]

    def parse(text: str) -> list[str]:
        items = re.findall(r"(\d+)\. (\S+)", text)
        assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))  # numbered 1, 2, ...
        return [w for _, w in items]

    return parse(example), parse(answer), parse(listed)


def fwe_words(user_text: str) -> list[str]:
    coded = user_text.split("coded words. ", 1)[1].split("\nQuestion:")[0]
    return coded.split()


@pytest.mark.parametrize("module", [cwe, fwe], ids=["cwe", "fwe"])
@pytest.mark.parametrize("length", [2048, 8192])
def test_prompt_fills_length_with_template(tok, smollm2, module, length):
    s = module.make_sample(tok, length, seed=3, template=smollm2.chat_prompt)
    total = n_tokens(tok, smollm2.chat_prompt(s.user_text))
    assert 0.97 * length <= total <= length
    plain = module.make_sample(tok, length, seed=3)
    assert 0.97 * length <= n_tokens(tok, plain.user_text) <= length
    assert n_tokens(tok, plain.user_text) > n_tokens(tok, s.user_text)  # the template's tokens were counted


@pytest.mark.parametrize("length,repeats", [(2048, (6, 1)), (8192, (30, 3))])
def test_cwe_answers_are_the_most_common_words(tok, length, repeats):
    s = cwe.make_sample(tok, length, seed=5)
    example, example_answer, listed = cwe_lists(s.user_text)
    counts = Counter(listed)
    assert len(s.answers) == 10 and len(listed) == s.list_words
    assert {w for w, _ in counts.most_common(10)} == set(s.answers)
    assert {counts[w] for w in s.answers} == {repeats[0]}
    assert {c for w, c in counts.items() if w not in s.answers} == {repeats[1]}
    assert len(counts) > 10 + 100  # uncommon words fill the length
    ex_counts = Counter(example)  # the worked example answers its own list
    assert {w for w, _ in ex_counts.most_common(10)} == set(example_answer)
    assert ex_counts[example_answer[0]] > max(c for w, c in ex_counts.items() if w not in example_answer)
    assert not set(example) & set(listed)
    assert s.user_text.endswith("Question: What are the 10 most common words in the above list?")


def test_cwe_vocabulary():
    words = cwe.english_words()
    assert len(words) > 2000 and list(words) == sorted(set(words))
    assert all(w.isalpha() and w.islower() and 4 <= len(w) <= 10 for w in words)
    for banned in ("that", "which", "words", "appear", "common", "answer", "list", "memorize", "kwargs", "lambda"):
        assert banned not in words


def test_base_model_prompt_counts_the_answer_prefix():
    """A base model completes RULER's answer prefix after "Answer:" (niah.generate adds it),
    so the length is counted with it; a chat model gets its chat template alone."""
    base = SimpleNamespace(lm=SimpleNamespace(tokenizer=SimpleNamespace(chat_template=None),
                                              chat_prompt=lambda s: s + "\n\nAnswer:"))
    assert cwe.prompt_template(base, cwe.ANSWER_PREFIX.format(n=10))("TEXT") == (
        "TEXT\n\nAnswer: The top 10 words that appear most often in the list are:")
    chat = SimpleNamespace(lm=SimpleNamespace(tokenizer=SimpleNamespace(chat_template="{{x}}"),
                                              chat_prompt=lambda s: f"<user>{s}</user>"))
    assert cwe.prompt_template(chat, fwe.ANSWER_PREFIX)("TEXT") == "<user>TEXT</user>"


def test_fwe_answers_are_ranks_two_to_four_and_counts_follow_zipf(tok):
    s = fwe.make_sample(tok, 8192, seed=5)
    words = fwe_words(s.user_text)
    ranked = Counter(words).most_common()
    assert ranked[0][0] == "..."  # the noise has rank 1
    assert [w for w, _ in ranked[1:4]] == s.answers
    assert ranked[3][1] > ranked[4][1]  # no tie with rank 5
    assert len(set(words)) <= 8192 // 50 and all(len(w) == 6 and w.isalpha() for w, _ in ranked[1:])
    # floor(n k^-2 / zeta(2)) for one n, zeta(2) = pi^2 / 6
    z = math.pi ** 2 / 6
    counts = [c for _, c in ranked]
    candidates = range(int(counts[0] * z), int((counts[0] + 1) * z) + 1)
    assert any([int(n / (k * k) / z) for k in range(1, len(counts) + 1)] == counts for n in candidates)


def test_zeta():
    assert fwe.zeta(2.0) == pytest.approx(math.pi ** 2 / 6, rel=1e-9)
    assert fwe.zeta(4.0) == pytest.approx(math.pi ** 4 / 90, rel=1e-9)
    assert fwe.zeta(1.5) == pytest.approx(2.6123753486854883, rel=1e-7)


@pytest.mark.parametrize("module", [cwe, fwe], ids=["cwe", "fwe"])
def test_deterministic_per_seed(tok, module):
    a = module.make_sample(tok, 2048, seed=11)
    b = module.make_sample(tok, 2048, seed=11)
    c = module.make_sample(tok, 2048, seed=12)
    assert a == b
    assert a.user_text != c.user_text and a.answers != c.answers


@pytest.mark.parametrize("module,length", [(cwe, 300), (fwe, 60)], ids=["cwe", "fwe"])
def test_too_short_is_a_clear_error(tok, module, length):
    with pytest.raises(ValueError, match="too short"):
        module.make_sample(tok, length, seed=1)


def test_score_words():
    answers = ["apple", "cat", "river"]
    assert cwe.score_words(answers, "1. Apple 2. CAT 3. river.") == 1.0
    assert cwe.score_words(answers, "apple, river") == pytest.approx(2 / 3)
    assert cwe.score_words(answers, "category, apples, riverbank, pineapple") == 0.0  # whole words only
    assert cwe.score_words(answers, "") == 0.0


@pytest.mark.parametrize("task,field,value", [
    ("cwe", "common_words", 0), ("cwe", "common_words", 20), ("cwe", "common_repeats", 3),
    ("cwe", "uncommon_repeats", "3"), ("cwe", "new_tokens", True),
    ("fwe", "alpha", 1.0), ("fwe", "alpha", "2"), ("fwe", "word_length", 2), ("fwe", "new_tokens", 0),
])
def test_bad_params_name_the_field(task, field, value):
    params = TASKS[task].Params(**{field: value})
    with pytest.raises(ValueError, match=f"tasks.{task}.{field}"):
        params.check()
    TASKS[task].Params().check()


def test_tiny_run_on_smollm2(smollm2, tmp_path):
    cfg = build.build_config({
        "model": "smollm2-135m", "methods": "full", "samples": 1,
        "tasks": {"cwe": {"lengths": [1024], "new_tokens": 4}, "fwe": {"lengths": [1024], "new_tokens": 4}},
    })
    outcome = runner.run(cfg, tmp_path, progress=False, lm=smollm2)
    assert outcome.failed == 0, runner.errors(tmp_path)
    assert outcome.measured == 2
    with Store(tmp_path) as store:
        rows = {r.task: r for r in store.rows()}
    for task, n_answers in (("cwe", 10), ("fwe", 3)):
        m = rows[task].metrics
        assert 0.0 <= rows[task].score == m["accuracy"] <= 1.0
        assert len(m["expected"]) == n_answers and isinstance(m["answer"], str)
        assert 900 <= m["prompt_tokens"] <= 1024 and m["generate_seconds"] > 0
    md, _ = report.write(tmp_path)
    text = md.read_text()
    assert "RULER aggregation (cwe, fwe)" in text and "cwe: accuracy" in text and "fwe: accuracy" in text
