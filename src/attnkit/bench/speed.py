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

Linear methods (``--family linear``) run their chunked forward (``form="auto"``) on the
per-call inputs they declare, generated deterministically (``linear_inputs.py``); for the
delta-rule methods q and k get ``kv_heads`` heads and v gets ``heads`` (value heads).
``gated_delta`` and ``kda`` are also compared with transformers' pure-PyTorch fallbacks
on the same inputs (``PEERS``; forward only): their own rows "NAME (transformers
fallback)", and on attnkit's row the speedup over them and the max relative output
difference max|o - o_tf| / max|o_tf|.
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


def make_inputs(length: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0,
                grouping: str = "gqa"):
    """q (1, heads, N, D), k, v (1, kv_heads, N, D); with ``grouping="value"`` (the delta
    rule's heads) q, k (1, kv_heads, N, D) and v (1, heads, N, D)."""
    g = torch.Generator().manual_seed(seed)
    hq, hk, hv = (kv_heads, kv_heads, heads) if grouping == "value" else (heads, kv_heads, kv_heads)
    q = torch.randn(1, hq, length, dim, generator=g, dtype=torch.float32).to(dtype)
    k = torch.randn(1, hk, length, dim, generator=g, dtype=torch.float32).to(dtype)
    v = torch.randn(1, hv, length, dim, generator=g, dtype=torch.float32).to(dtype)
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
    peers: bool = True,
) -> SpeedRow:
    """Latency / peak memory of one method at one length (and of FlexAttention on its
    pattern); with ``backward`` the backward pass (see module doc)."""
    import attnkit as ak

    from .linear_inputs import method_inputs

    name, config = parse_method_spec(spec, length)
    method = ak.get(name, **config)
    q, k, v = make_inputs(length, heads, kv_heads, dim, dtype, grouping=getattr(method, "grouping", "gqa"))
    inputs = method_inputs(method, q, k, v)
    is_causal = causal and "causal" in method.info.supports
    with torch.no_grad():
        try:
            _, stats = method(q, k, v, causal=is_causal, return_stats=True, **inputs)
        except ValueError as err:
            if not is_causal or "causal" not in str(err):
                raise
            is_causal = False  # e.g. a 2D neighborhood: causality is not defined on a grid
            _, stats = method(q, k, v, causal=False, return_stats=True, **inputs)
    if backward:
        run, timed = _backward_runs(method, q, k, v, is_causal, inputs)
    else:
        run = lambda: method(q, k, v, causal=is_causal, check_finite=False, **inputs)  # noqa: E731
        timed = run
    with PeakMemory() as mem:
        run()
    runs = median_seconds(timed, repeats=repeats, warmup=0)
    row = SpeedRow(spec, length, stats.backend, statistics.median(runs), runs, mem.grown / 2**20, stats.density)
    row.extra["causal"] = is_causal
    row.extra["pass"] = "backward" if backward else "forward"
    if inputs:
        row.extra["inputs"] = {key: list(t.shape) for key, t in inputs.items()}
    if flex and not backward and stats.pattern is not None:
        try:
            _measure_flex(row, method, q, k, v, is_causal, repeats)
        except (RuntimeError, MemoryError) as err:  # a compile failure must not lose the row
            row.extra["flex_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    if peers and not backward and name in PEERS:
        peer = measure_peer(row, method, q, k, v, inputs, repeats)
        if peer is not None:
            row.extra["peer_row"] = peer
    return row


# attnkit method -> (transformers module, its pure-PyTorch chunked fallback): the peers of
# the issue's speed targets, called on the same inputs in transformers' (B, N, H, D) layout
PEERS = {
    "gated_delta": ("transformers.models.qwen3_next.modeling_qwen3_next", "torch_chunk_gated_delta_rule"),
    "kda": ("transformers.models.kimi_linear.modeling_kimi_linear", "chunk_kimi_delta_attention"),
}


def peer_label(name: str) -> str:
    return f"{name} (transformers fallback)"


def measure_peer(row: SpeedRow, method: Any, q, k, v, inputs: dict, repeats: int) -> Optional[SpeedRow]:
    """Time transformers' fallback of ``method`` (``PEERS``) on the inputs attnkit's row ran;
    sets on ``row`` the speedup over it and the max relative output difference. None (and
    ``row.extra["transformers_error"]``) when transformers or the function is missing."""
    import importlib

    module, func_name = PEERS[method.name]
    try:
        func = getattr(importlib.import_module(module), func_name)
    except (ImportError, AttributeError) as err:
        row.extra["transformers_error"] = f"{type(err).__name__}: {err}"
        return None
    with torch.no_grad():
        out = method(q, k, v, causal=True, check_finite=False, **inputs)
    hk, hv = k.shape[1], v.shape[1]
    if method.name == "kda" and hk != hv:  # Kimi's fallback has no grouped heads: repeat q, k per value head
        q, k = (t.repeat_interleave(hv // hk, dim=1) for t in (q, k))
    tf = [t.transpose(1, 2).contiguous() for t in (q, k, v, inputs["g"], inputs["beta"])]
    kw = dict(chunk_size=method.config.chunk_size, use_qk_l2norm_in_kernel=method.config.use_qk_l2norm)

    def call():
        with torch.no_grad():
            return func(*tf, **kw)[0]

    with PeakMemory() as mem:
        ref = call()
    runs = median_seconds(call, repeats=repeats, warmup=0)
    peer = SpeedRow(peer_label(method.name), row.length, "transformers", statistics.median(runs), runs,
                    mem.grown / 2**20, float("nan"))
    peer.extra.update({"causal": True, "pass": "forward", "function": f"{module}.{func_name}"})
    row.extra["speedup_vs_transformers"] = peer.seconds / row.seconds
    row.extra["transformers_max_rel_diff"] = max_rel_diff(out, ref.transpose(1, 2))
    return peer


def _backward_runs(method: Any, q, k, v, causal: bool, inputs: Optional[dict] = None):
    """(forward + backward, a timed callable whose time is the backward alone); ``inputs``:
    the method's per-call tensors (no gradient taken for them)."""
    inputs = inputs or {}
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    heads = max(q.shape[1], v.shape[1])  # the output's heads (Hq; Hv for the delta rule)
    grad = torch.randn((q.shape[0], heads, q.shape[2], v.shape[-1]), generator=torch.Generator().manual_seed(1),
                       dtype=q.dtype)

    def both():
        out = method(q, k, v, causal=causal, check_finite=False, **inputs)
        torch.autograd.grad(out, (q, k, v), grad)

    class _Timed:
        """Runs an untimed forward first; ``median_seconds`` times only the backward."""

        def __call__(self):
            out = method(q, k, v, causal=causal, check_finite=False, **inputs)
            start = time.perf_counter()
            torch.autograd.grad(out, (q, k, v), grad)
            return time.perf_counter() - start

    return both, _Timed()


def max_rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (float64)."""
    err = (out.double() - ref.double()).abs().max().item()
    return err / max(ref.double().abs().max().item(), 1e-300)


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
    peers: bool = True,
    **shape: Any,
) -> list[SpeedRow]:
    """Measure every method at every length; exact attention ("full") is the baseline
    (forward, or its backward with ``backward``). With ``peers`` (forward only) a method of
    ``PEERS`` is followed by the row of its transformers fallback."""
    methods = list(methods)
    if "full" not in methods:
        methods = ["full"] + methods
    rows: list[SpeedRow] = []
    for length in lengths:
        baseline = None
        for spec in methods:
            if progress:
                progress(f"{spec} @ {length}")
            row = measure(spec, length, repeats=repeats, flex=flex, backward=backward, peers=peers, **shape)
            if spec == "full":
                baseline = row.seconds
            peer = row.extra.pop("peer_row", None)
            if peer is not None and progress:
                progress(f"{peer.method} @ {length}")
            for r in (row, peer) if peer is not None else (row,):
                r.speedup_vs_sdpa = baseline / r.seconds if baseline else None
                rows.append(r)
    return rows


def peer_count(methods: Iterable[str], backward: bool = False, peers: bool = True) -> int:
    """How many transformers-fallback rows ``run_speed`` adds per length."""
    if backward or not peers:
        return 0
    return sum(parse_method_spec(spec, 1)[0] in PEERS for spec in methods)


def rows_to_json(rows: list[SpeedRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
