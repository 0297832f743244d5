"""Best method per family: for each method family (exact, static sparse, dynamic sparse
prefill; KV-cache policies per budget) and each length, the method with the highest
accuracy on the accuracy tasks' cases that `full` solves (issue 17: "for each family the
best method at each length and budget").

Only cases where `full` with the normal cache reaches the pass mark count (a comparison
on a case exact attention fails says nothing about a method), and only methods measured
on every such case of that length (a method that skipped some would be compared on an
easier subset). Ties go to the faster setting (mean ``generate_seconds``: prefill plus
the answer's decode steps, in the same run) for prefill methods and to the one holding
fewer KV bytes for cache policies; a policy holding the full cache's bytes or more saves
nothing and is left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

from ..store import Row
from .aggregate import case_of, fmt, full_solved, group, mean, task_class
from .kvbytes import FULL_SHARE
from .page import Report, Table

EQUAL = 1e-9


def family_of(r: Row) -> str:
    """The family of a row's setting: its cache policy's (``kv_cache``) or its prefill method's."""
    if r.cache:
        return "kv_cache"
    from ...registry import methods

    families = {m.name: m.family for m in methods()}
    return families.get(r.method, "other")


def _accuracy_rows(rows: Iterable[Row]) -> list[Row]:
    return [r for r in rows if task_class(r.task).pass_mark is not None and r.score is not None]


def best_by_family(rows: list[Row]) -> list[dict[str, Any]]:
    """One dict per (family, budget, length): the best setting and its numbers (see the
    module docstring); empty without `full` rows to decide the solved cases."""
    scored = _accuracy_rows(rows)
    solved = full_solved(scored)
    if not solved:
        return []
    out = []
    for length in sorted({c[2] for c in solved}):
        cases = {c for c in solved if c[2] == length}
        at = [r for r in scored if case_of(r) in cases]
        for (family, budget), rs in sorted(group(at, lambda r: (family_of(r), r.budget)).items()):
            best = _best(rs, cases, family)
            if best is not None:
                out.append({"family": family, "budget": budget, "length": length, **best})
    return out


def _best(rows: list[Row], cases: set[tuple], family: str) -> Optional[dict[str, Any]]:
    """The best label among ``rows`` measured on every case of ``cases``."""
    candidates = []
    for label, rs in group(rows, lambda r: r.label).items():
        if {case_of(r) for r in rs} != cases:
            continue
        acc = mean(r.score for r in rs)
        cost = mean(r.metrics.get("kv_bytes") if family == "kv_cache" else r.metrics.get("generate_seconds")
                    for r in rs)
        share = mean(_share(r) for r in rs) if family == "kv_cache" else None
        if share is not None and share >= FULL_SHARE:
            continue  # holds the full cache's bytes or more: saves nothing, never "best"
        candidates.append({"label": label, "accuracy": acc, "cost": cost, "kv_share": share})
    if not candidates:
        return None
    top = max(c["accuracy"] for c in candidates)
    tied = [c for c in candidates if c["accuracy"] >= top - EQUAL]
    best = min(tied, key=lambda c: (c["cost"] is None, c["cost"] or 0.0))
    return {**best, "cases": len(cases), "candidates": len(candidates)}


def _share(r: Row) -> Optional[float]:
    held, full = r.metrics.get("kv_bytes"), r.metrics.get("kv_full_bytes")
    return held / full if held is not None and full else None


FAMILY_ORDER = {"exact": 0, "static_sparse": 1, "dynamic_sparse": 2, "kv_cache": 3}


def best_section(rep: Report, rows: list[Row]) -> None:
    """The "best method per family" table (nothing without `full`-solved cases or with
    only `full` measured)."""
    entries = best_by_family(rows)
    if not entries or all(e["family"] == "exact" for e in entries):
        return
    rep.h2("Best method per family")
    rep.p("On the accuracy tasks' cases that exact attention (`full`, normal cache) solves: per family, length "
          "and KV budget, the setting with the highest mean accuracy among those measured on every such case; "
          "ties go to the faster prefill (mean prefill + answer seconds) or to the smaller KV cache.")
    t = Table("Best setting per family, length and budget",
              ["family", "KV budget", "length", "best setting", "accuracy", "seconds / KV bytes held",
               "cases", "settings compared"])
    entries.sort(key=lambda e: (FAMILY_ORDER.get(e["family"], 9), e["budget"], e["length"]))
    for e in entries:
        cost = (f"{fmt(e['cost'] / 2 ** 20)} MiB ({100 * e['kv_share']:.0f}% of full)"
                if e["family"] == "kv_cache" and e["cost"] is not None and e["kv_share"] is not None
                else f"{fmt(e['cost'])} s")
        t.add(e["family"], e["budget"] or "-", str(e["length"]), e["label"], fmt(e["accuracy"]), cost,
              str(e["cases"]), str(e["candidates"]))
    rep.table(t)
