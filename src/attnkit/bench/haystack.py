"""Long filler text for retrieval tasks, from files already on the machine (no downloads).

Four kinds:

- ``"licenses"``: real English prose: the license texts in ``/usr/share/common-licenses``
  (GPL-3, Apache-2.0, MPL-2.0, ...) concatenated, repeated as needed, from a seeded sentence;
- ``"gpl3"``: the GPL-3 alone, always from its first line (7,658 SmolLM2 tokens; repeated
  beyond): the haystack of the KV-cache needle anchor (docs/kv-cache.md);
- ``"pydoc"``: Python's own reference documentation (``pydoc_data.topics``, shipped with
  every CPython), from its first topic: technical English prose that shares no text with
  the licenses — the calibration text of trained estimators (``attnkit calibrate-sea``);
- ``"noise"``: the repeated-essay noise of the passkey test ("The grass is green. The
  sky is blue. ..."), which carries no information a needle could be confused with.

``context(tokenizer, n_tokens, seed, kind)`` cuts ``n_tokens`` tokens of it starting at
a seeded sentence; ``insert(text, [(depth, sentence), ...])`` puts sentences at
fractional depths (0 = start, 1 = end), on sentence boundaries.
"""

from __future__ import annotations

import bisect
import functools
import random
import weakref
import re
from pathlib import Path
from typing import Any, Sequence

LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GPL-2", "GFDL-1.3", "Artistic", "CC0-1.0")
KINDS = ("licenses", "noise", "gpl3", "pydoc")

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again. ")

_BOUNDARY = re.compile(r"(?<=[.!?;:])\s+|\n\s*\n")


@functools.lru_cache(maxsize=None)
def license_text() -> str:
    """The license texts on this machine, concatenated (FileNotFoundError if none)."""
    parts = []
    for name in LICENSE_FILES:
        path = LICENSE_DIR / name
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8", errors="replace").strip())
    if not parts:
        raise FileNotFoundError(
            f"no license texts in {LICENSE_DIR} (Debian's base-files ships them); "
            "use haystack 'noise' instead"
        )
    return "\n\n".join(parts)


@functools.cache
def gpl3_text() -> str:
    """The GPL-3 as shipped on Debian machines (FileNotFoundError if absent)."""
    path = LICENSE_DIR / "GPL-3"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not on this machine (Debian's base-files ships it); "
                                "use haystack 'licenses' or 'noise' instead")
    return path.read_text(encoding="utf-8", errors="replace").strip()


@functools.cache
def pydoc_text() -> str:
    """Python's reference documentation topics (``pydoc_data.topics``), sorted by topic name."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def source_text(kind: str) -> str:
    if kind == "pydoc":
        return pydoc_text()
    if kind == "licenses":
        return license_text()
    if kind == "gpl3":
        return gpl3_text()
    if kind == "noise":
        return NOISE * 64
    raise ValueError(f"haystack: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Distinct lowercase words of 4-10 letters (with a vowel) written in lowercase in the texts on this machine
    (the license texts and Python's docs), sorted: the word source of RULER-style keys
    and word lists (RULER draws from the ``wonderwords`` lists, which are not offline)."""
    words: set[str] = set()
    for text in (license_text(), pydoc_text()):
        words.update(re.findall(r"(?<![\w'-])[a-z]{4,10}(?![\w'-])", text))
    return tuple(sorted(w for w in words if re.search("[aeiou]", w) and not re.search(r"(.)\1\1", w)))


def boundaries(text: str) -> list[int]:
    """Character offsets where a sentence may be inserted: 0, each sentence end, len(text)."""
    out = [0] + [m.end() for m in _BOUNDARY.finditer(text)]
    if out[-1] != len(text):
        out.append(len(text))
    return out


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def context(tokenizer: Any, n_tokens: int, seed: int = 0, kind: str = "licenses") -> str:
    """About ``n_tokens`` tokens of filler text starting at a seeded sentence boundary."""
    if n_tokens <= 0:
        return ""
    source = source_text(kind)
    starts = boundaries(source)[:-1]
    start = random.Random(seed).choice(starts) if kind == "licenses" else 0
    rotated = source[start:] + "\n\n" + source[:start]
    ids = _encoded(tokenizer, rotated)
    reps = -(-n_tokens // max(len(ids), 1))
    if reps > 1:
        ids = _encoded(tokenizer, "\n\n".join([rotated] * reps))
    text = tokenizer.decode(ids[:n_tokens])
    # End on a sentence boundary when one is near, so an inserted needle is not glued to a
    # half word, and the question starts on its own line. Not for "gpl3": the anchor's
    # haystack is exactly the first n tokens of the GPL-3 (kvpress-style), so the prompt
    # has the requested length.
    cut = boundaries(text)
    last = cut[-2] if len(cut) > 1 else len(text)
    if kind != "gpl3" and len(text) - last < min(200, len(text) // 30):
        text = text[:last]
    return text.strip()


# Per tokenizer (weakly held: an id() of a dead tokenizer may be reused by a new one).
_ENCODED: "weakref.WeakKeyDictionary[Any, dict[str, tuple[int, ...]]]" = weakref.WeakKeyDictionary()


def _encoded(tokenizer: Any, text: str) -> tuple[int, ...]:
    """Token ids of ``text``, memoised per (tokenizer, text): contexts share one source."""
    try:
        memo = _ENCODED.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no memo
        return tuple(encode(tokenizer, text))
    if text not in memo:
        if len(memo) > 32:
            memo.clear()
        memo[text] = tuple(encode(tokenizer, text))
    return memo[text]


def insert(text: str, items: Sequence[tuple[float, str]]) -> tuple[str, list[int]]:
    """Insert each sentence at the sentence boundary nearest its depth (0..1 of ``text``).

    Returns the new text and the character offset of each inserted sentence in it
    (in the order of ``items``).
    """
    cuts = boundaries(text)
    placed = []
    for order, (depth, sentence) in enumerate(items):
        if not 0 <= depth <= 1:
            raise ValueError(f"depth must be in 0..1, got {depth}")
        target = depth * len(text)
        i = bisect.bisect_left(cuts, target)
        best = min((c for c in cuts[max(i - 1, 0): i + 1]), key=lambda c: abs(c - target))
        placed.append((best, order, sentence))
    placed.sort()
    out, offsets, prev = [], [0] * len(items), 0
    length = 0
    for cut, order, sentence in placed:
        chunk = text[prev:cut]
        out.append(chunk)
        length += len(chunk)
        sep_before = "" if cut == 0 or chunk.endswith((" ", "\n")) else " "
        out.append(sep_before)
        length += len(sep_before)
        offsets[order] = length
        out.append(sentence + " ")
        length += len(sentence) + 1
        prev = cut
    out.append(text[prev:])
    return "".join(out), offsets


class WordTokenizer:
    """A stand-in tokenizer (one token per whitespace-separated word) for tests and
    for building prompts without a model; ``encode``/``decode`` like transformers'."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self._words = getattr(self, "_words", {})
        self._back = getattr(self, "_back", [])
        ids = []
        for w in text.split():
            if w not in self._words:
                self._words[w] = len(self._back)
                self._back.append(w)
            ids.append(self._words[w])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self._back[i] for i in ids)
