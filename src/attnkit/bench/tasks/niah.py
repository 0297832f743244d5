"""Needle in a haystack on a chat model, RULER-style (Hsieh et al. 2024, arXiv 2404.06654).

Variants:

- ``single``: one needle "The special magic number is 58213." asked back;
- ``multikey``: ``needles`` needles "The special magic number for amber-falcon is ...",
  one key asked (the others are distractors);
- ``multivalue``: ``needles`` values for one key, all asked;
- ``multiquery``: ``needles`` keys, ``queries`` of them asked at once;
- RULER's eight NIAH tasks by their RULER names (``niah_single_1`` ... ``niah_multiquery``,
  or ``ruler`` for all eight; see ``niah_ruler``): each fixes its own haystack, key and
  value kinds and needle counts (the ``haystack``, ``needles`` and ``queries`` settings
  apply to the four variants above only).

The asked needle (the first asked, for several) sits at the case's depth: 0 = start of
the haystack, 1 = just before the question; the other needles at seeded random depths.
The prompt is the haystack followed by the question, as one user turn in the model's
chat template, about ``length`` tokens in all. The answer is ``new_tokens`` greedy tokens
(SmolLM2 answers in a sentence, so >= 24); score = share of the asked values that appear
in it as whole numbers.

With a KV-cache setting (``--cache POLICY --budgets ...``) the whole prompt, question
included, is prefilled, the cache is compressed, then the answer is generated
(kvpress's setting); the row also records the cache's bytes against a full cache.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import haystack
from ..spec import CacheRun, MethodSpec, TaskSpec
from .base import PASS_MARK, Case, Context, Section, Task, register_task
from .niah_ruler import RECIPES, make_prompt

VARIANTS = ("single", "multikey", "multivalue", "multiquery", *RECIPES)

_ADJ = ("amber", "brisk", "cobalt", "dusty", "eager", "frosty", "gentle", "hollow", "ivory", "jolly",
        "lunar", "mellow", "noble", "olive", "quiet", "rusty", "silver", "tidal", "velvet", "windy")
_NOUN = ("falcon", "harbor", "lantern", "meadow", "orchid", "pebble", "quartz", "raven", "saddle",
         "thistle", "willow", "anchor", "beacon", "canyon", "ember", "glacier", "island", "juniper")


@dataclass
class Sample:
    """A generated prompt: ``user_text`` (haystack + question), the ``answers`` to find,
    and where the needles went (character offsets in ``user_text``, asked ones first)."""

    user_text: str
    answers: list[str]
    needles: list[str]
    offsets: list[int]
    context_chars: int  # the haystack (with needles) is user_text[:context_chars]
    answer_prefix: str | None = None  # a base model's answer start (None: derived from the question)


def _number(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in _ADJ for b in _NOUN], n)
    return [f"{a}-{b}" for a, b in pairs]


def make_sample(
    tokenizer: Any,
    length: int,
    depth: float,
    seed: int,
    variant: str = "single",
    kind: str = "licenses",
    needles: int = 4,
    queries: int = 2,
    template: Callable[[str], str] = lambda s: s,
) -> Sample:
    """A seeded NIAH prompt of about ``length`` tokens (counted with ``template`` applied:
    pass the chat template so the whole prompt fits). Deterministic per arguments."""
    if variant not in VARIANTS:
        raise ValueError(f"niah: unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    if variant in RECIPES:
        r = make_prompt(variant, depth, seed)
        return build(tokenizer, length, seed, r.kind, r.placed, r.question, r.answers, template, r.preamble,
                     r.filler, r.answer_prefix)
    rng = random.Random(seed)
    if variant == "single":
        value = _number(rng)
        placed = [(depth, f"The special magic number is {value}.")]
        answers = [value]
        question = "What is the special magic number mentioned in the text above?"
    elif variant == "multikey":
        keys = _keys(rng, needles)
        values = [_number(rng) for _ in keys]
        placed = [(depth, f"The special magic number for {keys[0]} is {values[0]}.")]
        placed += [(rng.random(), f"The special magic number for {k} is {v}.") for k, v in zip(keys[1:], values[1:])]
        answers = [values[0]]
        question = f"What is the special magic number for {keys[0]} mentioned in the text above?"
    elif variant == "multivalue":
        key = _keys(rng, 1)[0]
        values = [_number(rng) for _ in range(needles)]
        depths = [depth] + [rng.random() for _ in values[1:]]
        placed = [(d, f"One of the special magic numbers for {key} is {v}.") for d, v in zip(depths, values)]
        answers = values
        question = f"What are all the special magic numbers for {key} mentioned in the text above?"
    else:  # multiquery
        keys = _keys(rng, needles)
        values = [_number(rng) for _ in keys]
        depths = [depth] + [rng.random() for _ in keys[1:]]
        placed = [(d, f"The special magic number for {k} is {v}.") for d, k, v in zip(depths, keys, values)]
        asked = min(max(queries, 1), needles)
        answers = values[:asked]
        question = ("What are the special magic numbers for " + ", ".join(keys[:asked])
                    + " mentioned in the text above?")
    return build(tokenizer, length, seed, kind, placed, question, answers, template)


def build(tokenizer: Any, length: int, seed: int, kind: str, placed: list[tuple[float, str]], question: str,
          answers: list[str], template: Callable[[str], str], preamble: str = "",
          filler: Callable[[Any, int], str] | None = None, answer_prefix: str | None = None) -> Sample:
    """Haystack of the right size + needles at their depths + question. The haystack is
    ``haystack.context(..., kind)``, or ``filler(tokenizer, n_tokens)`` if given."""
    fixed = template(preamble + " ".join(s for _, s in placed) + "\n\n" + question + " " + (answer_prefix or ""))
    budget = max(length - len(haystack.encode(tokenizer, fixed)), 0)
    text = filler(tokenizer, budget) if filler else haystack.context(tokenizer, budget, seed=seed, kind=kind)
    text, offsets = haystack.insert(text, placed)
    user_text = f"{preamble}{text}\n\n{question}"
    offsets = [o + len(preamble) for o in offsets]
    return Sample(user_text, answers, [s for _, s in placed], offsets, len(preamble) + len(text), answer_prefix)


def is_base_model(ctx: Context) -> bool:
    """True for a model without a chat template (prompted by completion, e.g. Gemma 3 270M)."""
    return not getattr(ctx.lm.tokenizer, "chat_template", None)


def derive_answer_prefix(question: str) -> str:
    """The start of the answer a base model completes, as RULER prompts base models:
    "What is the special magic number for X mentioned in the text above?" -> "The
    special magic number for X mentioned in the text above is"; "" for other questions."""
    for start, verb in (("What is the ", "is"), ("What are all the ", "are"), ("What are the ", "are")):
        if question.startswith(start) and question.endswith("?"):
            return f"The {question[len(start):-1]} {verb}"
    return ""


def found(value: str, answer: str) -> bool:
    """``value`` appears in ``answer`` as a whole token (58213 does not match 582130)."""
    if value.isdigit():
        return re.search(rf"(?<!\d){re.escape(value)}(?!\d)", answer) is not None
    return re.search(rf"(?<![\w]){re.escape(value)}(?![\w])", answer) is not None


def score(answers: list[str], answer: str) -> float:
    """Share of ``answers`` found in the model's ``answer``."""
    if not answers:
        return 0.0
    return sum(found(a, answer) for a in answers) / len(answers)


def generate(ctx: Context, method: MethodSpec, user_text: str, new_tokens: int,
             cache: CacheRun | None = None, answer_prefix: str | None = None) -> dict[str, Any]:
    """Greedy answer of the chat model to ``user_text`` with ``method`` on every layer's
    prefill, and ``cache`` (a fresh ``attnkit.KVCache``) as the cache if given.

    A base model (no chat template) gets a completion prompt, as RULER prompts base
    models: the text, ``Answer:`` and ``answer_prefix`` (``None``: derived from the
    question at the end of ``user_text`` by ``derive_answer_prefix()``). A chat model gets the
    text as one user turn and no prefix."""
    import torch

    from ... import patching

    lm = ctx.lm
    prompt = lm.chat_prompt(user_text)
    if is_base_model(ctx):  # RULER's answer prefix after "Answer:"
        prefix = derive_answer_prefix(user_text.rsplit("\n\n", 1)[-1]) if answer_prefix is None else answer_prefix
        prompt = prompt + " " + prefix if prefix else prompt
    enc = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    kv = None if cache is None else cache.make()
    extra = {} if kv is None else {"past_key_values": kv}
    start = time.perf_counter()
    with torch.inference_mode(), patching.patch(lm.model, prefill=method.name, **method.kwargs):
        out = lm.model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                                temperature=None, top_p=None, top_k=None, **extra)
    seconds = time.perf_counter() - start
    n_prompt = enc["input_ids"].shape[1]
    answer = lm.tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True)
    result = {"answer": answer, "prompt_tokens": int(n_prompt), "generate_seconds": seconds}
    if kv is not None:
        result.update(kv_metrics(kv))
    return result


def kv_metrics(kv: Any) -> dict[str, Any]:
    """What an ``attnkit.KVCache`` holds now: bytes, bytes of a full cache of the same
    tokens (all layers, and the layers the policy compresses: Gemma 3's global layers),
    tokens kept per KV head (mean and max over layers)."""
    stats = kv.stats()
    kept = stats["kept_per_layer"] or [0]
    return {"kv_bytes": stats["nbytes"], "kv_full_bytes": stats["full_nbytes"],
            "kv_policy_layers_bytes": stats["policy_layers_nbytes"],
            "kv_policy_layers_full_bytes": stats["policy_layers_full_nbytes"],
            "kv_kept_mean": sum(kept) / len(kept), "kv_kept_max": max(kept), "kv_seen": stats["seen"]}


RETRIEVAL_SECTION = Section(
    title="Retrieval accuracy", layout="retrieval", figures=("heatmap", "vs_depth"), order=10,
    intro="Share of the asked values found in the greedy answer, by needle depth (0% = start of the context, "
          "100% = just before the question). A local method (sliding window, streaming) fails where the needle "
          "lies further back than its reach.")


@register_task("niah")
class NIAH(Task):
    uses_depth = True
    uses_cache = True
    score_name = "accuracy"
    pass_mark = PASS_MARK
    section = RETRIEVAL_SECTION

    @dataclass
    class Params:
        variants: list[str] = field(default_factory=lambda: ["single"])
        haystack: str = "licenses"
        needles: int = 4
        queries: int = 2
        new_tokens: int = 24

        def check(self) -> None:
            if isinstance(self.variants, str):
                self.variants = [v.strip() for v in self.variants.split(",") if v.strip()]
            self.variants = [r for v in self.variants for r in (RECIPES if v == "ruler" else [v])]
            for v in self.variants:
                if v not in VARIANTS:
                    raise ValueError(f"tasks.niah.variants: unknown {v!r}; allowed: {', '.join(VARIANTS)}, "
                                     "or 'ruler' (RULER's eight)")
            if self.haystack not in haystack.KINDS:
                raise ValueError(f"tasks.niah.haystack: unknown {self.haystack!r}; allowed: {', '.join(haystack.KINDS)}")
            for name in ("needles", "queries", "new_tokens"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"tasks.niah.{name}: must be an integer >= 1, got {value!r}")

    def variants(self, spec: TaskSpec) -> list[str]:
        return list(spec.params.variants)

    def sample(self, ctx: Context, case: Case, spec: TaskSpec) -> Sample:
        p = spec.params
        key = ("niah", case)
        if key not in ctx.memo:
            ctx.memo[key] = make_sample(ctx.lm.tokenizer, case.length, case.depth or 0.0, case.seed, case.variant,
                                        p.haystack, p.needles, p.queries, template=ctx.lm.chat_prompt)
        return ctx.memo[key]

    def measure(self, ctx: Context, case: Case, method: MethodSpec, spec: TaskSpec,
                cache: CacheRun | None = None) -> dict[str, Any]:
        s = self.sample(ctx, case, spec)
        return answer_metrics(ctx, generate(ctx, method, s.user_text, answer_tokens(s, spec.params.new_tokens), cache,
                                            s.answer_prefix), s)


def answer_tokens(s: Sample, new_tokens: int) -> int:
    """Tokens to generate: ``new_tokens``, more where several values or uuids are asked
    (a uuid is ~25 tokens)."""
    per_answer = 28 if any(len(a) == 36 and a.count("-") == 4 for a in s.answers) else 12
    return new_tokens if len(s.answers) == 1 and per_answer == 12 else max(new_tokens, per_answer * len(s.answers) + 12)


def answer_metrics(ctx: Context, result: dict[str, Any], s: Sample) -> dict[str, Any]:
    """Metrics of one answer; ``tokens_after_needle``: how far back from the question
    (the end of the user text) the first asked needle starts."""
    return {**scored_answer(result, s.answers, score(s.answers, result["answer"])),
            "tokens_after_needle": len(haystack.encode(ctx.lm.tokenizer, s.user_text[s.offsets[0]:]))}


def scored_answer(result: dict[str, Any], expected: list[str], value: float) -> dict[str, Any]:
    """The metrics every answer-scored task stores: score (= accuracy), the answer, the
    expected values, prompt tokens, seconds and the KV-cache entries of ``result``."""
    return {
        "score": value,
        "accuracy": value,
        "correct": value == 1.0,
        "answer": result["answer"],
        "expected": expected,
        "prompt_tokens": result["prompt_tokens"],
        "generate_seconds": result["generate_seconds"],
        **{k: v for k, v in result.items() if k.startswith("kv_")},
    }
