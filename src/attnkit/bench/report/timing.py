"""Timing noise: the spread of a row's timed prefill repeats (``prefill_seconds`` is
their median, ``prefill_seconds_min`` / ``_max`` their range; ``model_speed``) and
whether a ratio of two timings is within that noise."""

from __future__ import annotations

from ..store import Row
from .aggregate import metric

SPREAD = 0.10  # (max - min) / median of the repeats above which a timing is noisy
NOISY = "(noisy!)"


def spread(rows: list[Row], prefix: str = "") -> float | None:
    """(max - min) / median of ``{prefix}prefill_seconds`` over the timed repeats of ``rows``
    (the widest min and max over samples, the mean of their medians); None without them."""
    lo, hi = _range(rows, prefix)
    med = metric(rows, f"{prefix}prefill_seconds")
    if not med or lo is None or hi is None:
        return None
    return (hi - lo) / med


def _range(rows: list[Row], prefix: str) -> tuple[float | None, float | None]:
    lo = [r.metrics.get(f"{prefix}prefill_seconds_min") for r in rows]
    hi = [r.metrics.get(f"{prefix}prefill_seconds_max") for r in rows]
    if not rows or any(v is None for v in lo + hi):
        return None, None
    return min(lo), max(hi)


def noisy_ratio(base: list[Row], rows: list[Row], base_prefix: str = "") -> bool:
    """Whether the speedup of ``rows`` over ``base`` (its ``{base_prefix}prefill_seconds``)
    is within timing noise: either spread above SPREAD, or base's min / max over the
    method's max / min straddling 1.0."""
    spreads = [spread(base, base_prefix), spread(rows)]
    if any(s is not None and s > SPREAD for s in spreads):
        return True
    (blo, bhi), (lo, hi) = _range(base, base_prefix), _range(rows, "")
    if None in (blo, bhi, lo, hi) or not lo or not hi:
        return False
    return blo / hi <= 1.0 <= bhi / lo


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"
