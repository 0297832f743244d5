"""The report's opening: what attnkit buys at the longest context measured.

One table at the longest length that ``model_speed`` measured: transformers' own
attention (timed in the same run by the ``full`` row), attnkit's exact path, each sparse
prefill method and each KV-cache setting, with prefill seconds and speedup, retrieval
accuracy at that length (``niah`` and the other retrieval tasks), KV bytes held and
decode time; then a "what to use when" paragraph derived from those numbers, never
written by hand. Sections are skipped when their numbers are missing.
"""

from __future__ import annotations

from typing import Any, Optional

from ..store import Row
from .aggregate import fmt, group, layout_of, metric
from .kvbytes import FULL_SHARE, compressed_text
from .page import Report, Table
from .timing import NOISY, SPREAD, noisy_ratio

SPEED_TASK = "model_speed"
EQUAL = 1e-9  # accuracies closer than this are equal


def headline_section(rep: Report, rows: list[Row]) -> None:
    """The headline table and paragraph (nothing when no ``model_speed`` row exists)."""
    speed = [r for r in rows if r.task == SPEED_TASK and not r.cache]
    if not speed:
        return
    length = max(r.length for r in speed)
    at = [r for r in rows if r.length == length or (r.task != SPEED_TASK and _near(r, length))]
    entries = _entries(at, length)
    if not entries:
        return
    model = sorted({r.model for r in speed})[0]
    rep.h2(f"Headline: {model} at {_tokens(length)} tokens")
    t = Table(f"What attnkit buys at {_tokens(length)} tokens (one run; accuracy: retrieval tasks at this length)",
              ["setting", "prefill s", "prefill speedup vs transformers", "max |logit diff| vs transformers",
               "accuracy", "KV bytes held (vs full cache)", "decode ms/token"],
              note=f"{NOISY}: the prefill repeats of the setting or of transformers spread more than "
                   f"{100 * SPREAD:.0f}% of their median, or the speedup's min-max range includes 1.0: within "
                   "timing noise." if any(e.get("noisy") for e in entries) else "")
    for e in entries:
        t.add(e["label"], fmt(e.get("prefill")), _x(e.get("speedup")) + (f" {NOISY}" if e.get("noisy") else ""), fmt(e.get("logit_diff")), fmt(e.get("accuracy")),
              _bytes(e.get("kv_bytes"), e.get("kv_share"), e.get("compressed", "")), fmt(e.get("decode")))
    rep.table(t)
    rep.p(what_to_use_when(entries, length))


def _near(row: Row, length: int) -> bool:
    """A retrieval row at ``length`` (its prompt is about that many tokens)."""
    return layout_of(row.task) == "retrieval" and row.length == length


def _entries(rows: list[Row], length: int) -> list[dict[str, Any]]:
    """One dict per setting: transformers, attnkit exact, methods, KV settings."""
    speed = {label: rs for label, rs in group([r for r in rows if r.task == SPEED_TASK], lambda r: r.label).items()}
    retrieval = [r for r in rows if layout_of(r.task) == "retrieval"]
    plain_acc = {label: metric(rs, "score") for label, rs in group([r for r in retrieval if not r.cache],
                                                                   lambda r: r.label).items()}
    out: list[dict[str, Any]] = []
    full = speed.get("full")
    base = metric(full, "transformers_prefill_seconds") if full else None
    if base is not None:
        out.append({"label": "transformers (its own attention)", "prefill": base, "speedup": 1.0,
                    "decode": metric(full, "transformers_decode_ms_per_token"),
                    "kv_bytes": metric(full, "transformers_kv_cache_bytes"), "kind": "transformers"})
    for label in dict.fromkeys([*speed, *plain_acc]):
        rs = speed.get(label, [])
        prefill = metric(rs, "prefill_seconds") if rs else None
        out.append({"label": "attnkit exact (full)" if label == "full" else label, "method": label,
                    "prefill": prefill, "speedup": base / prefill if base and prefill else None,
                    "logit_diff": metric(rs, "max_abs_logit_diff_vs_transformers") if rs else None,
                    "accuracy": plain_acc.get(label), "decode": metric(rs, "decode_ms_per_token") if rs else None,
                    "kv_bytes": metric(rs, "kv_cache_bytes") if rs else None,
                    "kind": "exact" if label == "full" else "method",
                    "noisy": bool(full and rs and noisy_ratio(full, rs, "transformers_"))})
    cached = group([r for r in retrieval if r.cache and r.method == "full"], lambda r: (r.cache, r.budget))
    for (cache, budget), rs in cached.items():
        held, full_bytes = metric(rs, "kv_bytes"), metric(rs, "kv_full_bytes")
        out.append({"label": f"KV cache {cache}@{budget}" if budget else f"KV cache {cache}", "method": "full",
                    "accuracy": metric(rs, "score"), "kv_bytes": held,
                    "kv_share": held / full_bytes if held is not None and full_bytes else None,
                    "compressed": compressed_text(rs), "kind": "cache"})
    return out


def what_to_use_when(entries: list[dict[str, Any]], length: int) -> str:
    """A paragraph of recommendations read off the entries (see the module docstring)."""
    exact = next((e for e in entries if e["kind"] == "exact"), None)
    parts = []
    if exact and exact.get("speedup"):
        diff = f" (last-token logits within {exact['logit_diff']:.1e})" if exact.get("logit_diff") is not None else ""
        noise = " (within timing noise)" if exact.get("noisy") else ""
        parts.append(f"For exact results at {_tokens(length)} tokens, `ak.patch(model)` with no method: prefill "
                     f"{exact['speedup']:.2f}x faster than transformers' own attention{noise}{diff}.")
    ref = exact.get("accuracy") if exact else None
    if ref is not None:
        parts.append(_best_method(entries, ref))
        parts.append(_best_cache(entries, ref))
    elif exact:
        parts.append("No retrieval task ran at this length, so no method's accuracy can be compared with exact attention.")
    return " ".join(p for p in parts if p)


def _best_method(entries: list[dict[str, Any]], ref: float) -> str:
    methods = [e for e in entries if e["kind"] == "method" and e.get("accuracy") is not None]
    keep = [e for e in methods if e["accuracy"] >= ref - EQUAL and e.get("speedup")]
    if keep:
        best = max(keep, key=lambda e: e["speedup"])
        return (f"The fastest prefill method that kept exact attention's accuracy ({ref:.2f}) here: `{best['label']}`, "
                f"{best['speedup']:.2f}x transformers.")
    if methods:
        top = max(methods, key=lambda e: e["accuracy"])
        return (f"No sparse prefill method kept exact attention's accuracy ({ref:.2f}); the best was `{top['label']}` "
                f"({top['accuracy']:.2f}): use exact attention for retrieval at this length.")
    return ""


def _best_cache(entries: list[dict[str, Any]], ref: float) -> str:
    caches = [e for e in entries if e["kind"] == "cache" and e.get("accuracy") is not None and e.get("kv_share")
              and e["kv_share"] < FULL_SHARE]  # a policy holding the full cache's bytes or more saves nothing
    keep = [e for e in caches if e["accuracy"] >= ref - EQUAL]
    if keep:
        best = min(keep, key=lambda e: e["kv_share"])
        return (f"The smallest KV cache that kept its accuracy: `{best['label']}`, {100 * best['kv_share']:.0f}% of "
                "the full cache's bytes.")
    if caches:
        top = max(caches, key=lambda e: (e["accuracy"], -e["kv_share"]))
        return (f"No KV-cache setting kept the full cache's accuracy; the best was `{top['label']}` "
                f"({top['accuracy']:.2f} with {100 * top['kv_share']:.0f}% of the bytes).")
    return ""


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _x(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _bytes(value: Optional[float], share: Optional[float], compressed: str = "") -> str:
    """``25.1 MiB (23%; compressed layers 11.0%)``; ``compressed``: kvbytes.compressed_text."""
    if value is None:
        return "-"
    mib = f"{value / 2 ** 20:.1f} MiB"
    if share is None:
        return mib
    return f"{mib} (holds {100 * share:.0f}% of full)" if share >= FULL_SHARE else f"{mib} ({100 * share:.0f}%{compressed})"
