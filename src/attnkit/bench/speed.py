"""Operator speed benchmark: latency and peak memory of methods versus length.

Every number is a median of several runs after a warm-up, reported next to exact SDPA
and FlexAttention measured in the same run (FlexAttention's compile time separately).
Peak memory is the peak growth of the process's resident memory during one call,
sampled by a background thread (CPU tensors are not tracked by any allocator counter).

``backward=True`` times the backward pass instead: each run does an untimed forward with
gradients enabled, then times ``torch.autograd.grad`` of the output (random output
gradient) for q, k and v; the baseline is SDPA's backward on the same inputs, and peak
memory covers forward + backward. FlexAttention is left out there (its CPU kernel has
no backward).
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

@dataclass
class SpeedRow:
    """One measured (method, length) point. Seconds are medians."""

    method: str
    length: int
    backend: str
    seconds: float
    runs: list[float]
    peak_mib: float
    density: float
    speedup_vs_sdpa: Optional[float] = None
    flex_seconds: Optional[float] = None
    flex_compile_seconds: Optional[float] = None
    speedup_vs_flex: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Context manager: peak growth of resident memory (bytes) while the block runs."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self.base = _rss_bytes()
        self.peak = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self.peak = max(self.peak, _rss_bytes())
        self._stop.set()
        self._thread.join()

    @property
    def grown(self) -> int:
        return max(0, self.peak - self.base)


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` runs; returns all run times.

    A callable that returns a float reports its own timed part (e.g. a backward pass
    after an untimed forward); that float is the run's time."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        own = fn()
        runs.append(own if isinstance(own, float) else time.perf_counter() - start)
    return runs


def parse_method_spec(spec: str, length: int) -> tuple[str, dict[str, Any]]:
    """``"streaming(sink=64,window=1024)"`` -> ("streaming", {...}); ``grid=2d`` -> a square-ish grid."""
    spec = spec.strip()
    if "(" not in spec:
        return spec, {}
    name, rest = spec.split("(", 1)
    if not rest.endswith(")"):
        raise ValueError(f"method spec {spec!r}: expected NAME(field=value,...)")
    config: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest[:-1].split(","))):
        if "=" not in item:
            raise ValueError(f"method spec {spec!r}: {item!r} is not field=value")
        key, value = (s.strip() for s in item.split("=", 1))
        config[key] = _parse_value(value, length)
    return name.strip(), config


def _parse_value(value: str, length: int) -> Any:
    if value == "2d":
        side = 1 << ((length.bit_length() - 1) // 2)
        return (length // side, side)
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def make_inputs(length: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, length, dim, generator=g, dtype=torch.float32).to(dtype)
    k = torch.randn(1, kv_heads, length, dim, generator=g, dtype=torch.float32).to(dtype)
    v = torch.randn(1, kv_heads, length, dim, generator=g, dtype=torch.float32).to(dtype)
    return q, k, v


def measure(
    spec: str,
    length: int,
    heads: int = 8,
    kv_heads: int = 8,
    dim: int = 64,
    dtype: torch.dtype = torch.float32,
    causal: bool = True,
    repeats: int = 5,
    flex: bool = True,
    backward: bool = False,
) -> SpeedRow:
    """Latency / peak memory of one method at one length (and of FlexAttention on its
    pattern); with ``backward`` the backward pass (see module doc)."""
    import attnkit as ak

    name, config = parse_method_spec(spec, length)
    q, k, v = make_inputs(length, heads, kv_heads, dim, dtype)
    method = ak.get(name, **config)
    is_causal = causal and "causal" in method.info.supports
    with torch.no_grad():
        try:
            _, stats = method(q, k, v, causal=is_causal, return_stats=True)
        except ValueError as err:
            if not is_causal or "causal" not in str(err):
                raise
            is_causal = False  # e.g. a 2D neighborhood: causality is not defined on a grid
            _, stats = method(q, k, v, causal=False, return_stats=True)
    if backward:
        run, timed = _backward_runs(method, q, k, v, is_causal)
    else:
        run = lambda: method(q, k, v, causal=is_causal, check_finite=False)  # noqa: E731
        timed = run
    with PeakMemory() as mem:
        run()
    runs = median_seconds(timed, repeats=repeats, warmup=0)
    row = SpeedRow(spec, length, stats.backend, statistics.median(runs), runs, mem.grown / 2**20, stats.density)
    row.extra["causal"] = is_causal
    row.extra["pass"] = "backward" if backward else "forward"
    if flex and not backward and stats.pattern is not None:
        try:
            _measure_flex(row, method, q, k, v, is_causal, repeats)
        except (RuntimeError, MemoryError) as err:  # a compile failure must not lose the row
            row.extra["flex_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    return row


def _backward_runs(method: Any, q, k, v, causal: bool):
    """(forward + backward, a timed callable whose time is the backward alone)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    grad = torch.randn(q.shape[:3] + (v.shape[-1],), generator=torch.Generator().manual_seed(1), dtype=q.dtype)

    def both():
        out = method(q, k, v, causal=causal, check_finite=False)
        torch.autograd.grad(out, (q, k, v), grad)

    class _Timed:
        """Runs an untimed forward first; ``median_seconds`` times only the backward."""

        def __call__(self):
            out = method(q, k, v, causal=causal, check_finite=False)
            start = time.perf_counter()
            torch.autograd.grad(out, (q, k, v), grad)
            return time.perf_counter() - start

    return both, _Timed()


def _measure_flex(row: SpeedRow, method: Any, q, k, v, causal: bool, repeats: int) -> None:
    start = time.perf_counter()
    method(q, k, v, causal=causal, backend="flex", check_finite=False)
    first = time.perf_counter() - start
    runs = median_seconds(lambda: method(q, k, v, causal=causal, backend="flex", check_finite=False), repeats=repeats, warmup=0)
    row.flex_seconds = statistics.median(runs)
    row.flex_compile_seconds = max(0.0, first - row.flex_seconds)
    row.speedup_vs_flex = row.flex_seconds / row.seconds


def run_speed(
    methods: Iterable[str],
    lengths: Iterable[int],
    repeats: int = 5,
    flex: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    backward: bool = False,
    **shape: Any,
) -> list[SpeedRow]:
    """Measure every method at every length; exact attention ("full") is the baseline
    (forward, or its backward with ``backward``)."""
    methods = list(methods)
    if "full" not in methods:
        methods = ["full"] + methods
    rows: list[SpeedRow] = []
    for length in lengths:
        baseline = None
        for spec in methods:
            if progress:
                progress(f"{spec} @ {length}")
            row = measure(spec, length, repeats=repeats, flex=flex, backward=backward, **shape)
            if spec == "full":
                baseline = row.seconds
            row.speedup_vs_sdpa = baseline / row.seconds if baseline else None
            rows.append(row)
    return rows


def rows_to_json(rows: list[SpeedRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
