"""The ``speed`` layout (model prefill / decode time and KV bytes vs length) and the
``kv_decode`` layout (decode speed and memory per KV-cache policy x budget)."""

from __future__ import annotations

import html

from ..store import Row
from ..tasks import Section
from .aggregate import (
    budget_sort,
    color,
    fmt,
    full_name,
    group,
    line_of,
    method_labels,
    metric,
)
from .multiples import MAX_LINES, curve, line_figure
from .page import Report, Table
from .timing import NOISY, SPREAD, noisy_ratio, pct, spread


def speed_layout(rep: Report, section: Section, rows: list[Row]) -> None:
    """Prefill seconds (and speedup vs full), decode ms/token and KV bytes per method and
    length; prefill and decode vs length, log-log (figure ``"vs_length"``)."""
    labels = method_labels(rows)
    by = group(rows, lambda r: (r.label, r.length))
    t = Table("Prefill, decode and KV cache (means over samples)",
              ["method", "length", "prefill s", "spread", "speedup vs full", "decode ms/token", "KV cache MiB", "n"],
              note=f"spread: (max - min) / median of the timed prefill repeats. {NOISY}: the method's or full's "
                   f"spread exceeds {100 * SPREAD:.0f}%, or the speedup's range (full's min / max over the "
                   "method's max / min) includes 1.0: the ratio is within timing noise.")
    full = {n: rs for (label, n), rs in by.items() if label == "full"}
    for (label, length) in sorted(by, key=lambda k: (labels.index(k[0]), k[1])):
        rs = by[(label, length)]
        pre, base = metric(rs, "prefill_seconds"), metric(full.get(length, []), "prefill_seconds")
        speedup = base / pre if base and pre else None
        kv = metric(rs, "kv_cache_bytes")
        noisy = speedup is not None and label != "full" and noisy_ratio(full[length], rs)
        t.add(label, length, fmt(pre), pct(spread(rs)), fmt(speedup) + (f" {NOISY}" if noisy else ""),
              fmt(metric(rs, "decode_ms_per_token")), fmt(kv / 2**20 if kv is not None else None), len(rs))
    rep.table(t)
    if "vs_length" in section.figures:
        _speed_figure(rep, labels, by)


def _speed_figure(rep: Report, labels: list[str], by: dict) -> None:
    """Prefill seconds and decode ms/token vs length, log-log: two panels of one figure, or
    one small-multiples figure per metric when many methods are drawn."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if len([label for label in labels if label != "full"]) > MAX_LINES:
        for name, title in (("prefill_seconds", "prefill seconds"), ("decode_ms_per_token", "decode ms / token")):
            curves = [curve(label, ns, [metric(by[(label, n)], name) for n in ns])
                      for label in labels for ns in [sorted(n for (lab, n) in by if lab == label)]]
            rep.fig(line_figure([c for c in curves if c["name"] != "full"], [c for c in curves if c["name"] == "full"],
                                f"Speed vs length: {title} (log-log)", "length (tokens)", title, x_type="log",
                                y_type="log"))
        return
    fig = make_subplots(rows=1, cols=2, subplot_titles=["prefill seconds", "decode ms / token"])
    for label in labels:
        lengths = sorted(n for (lab, n) in by if lab == label)
        fig.add_trace(go.Scatter(x=lengths, y=[metric(by[(label, n)], "prefill_seconds") for n in lengths],
                                 mode="lines+markers", name=html.escape(label), legendgroup=label,
                                 line={"color": color(labels, label)}), row=1, col=1)
        fig.add_trace(go.Scatter(x=lengths, y=[metric(by[(label, n)], "decode_ms_per_token") for n in lengths],
                                 mode="lines+markers", name=html.escape(label), legendgroup=label, showlegend=False,
                                 line={"color": color(labels, label)}), row=1, col=2)
    fig.update_xaxes(type="log", title_text="length (tokens)")
    fig.update_yaxes(type="log")
    fig.update_layout(title="Speed vs length (log-log)", height=400)
    rep.fig(fig)


def kv_decode_layout(rep: Report, section: Section, rows: list[Row]) -> None:
    """Decode ms/token and KV bytes per cache policy x budget (rows of every cache
    setting, the normal cache as reference)."""
    t = Table("Decode ms/token (median of timed steps, warm-up excluded) and KV bytes, per policy x budget",
              ["cache", "budget", "context", "KV MiB", "full / KV", "decode ms/token", "speedup vs full",
               "prefill s", "n"],
              note="KV bytes after the decode steps (attnkit caches: keys, values, slot positions, policy state and "
                   "observation window); full / KV: bytes of a full cache of the same tokens over the bytes held.")
    by = group(rows, lambda r: (r.method, r.config, line_of(r) if r.cache else "", r.budget, r.length))
    full_ms = {(k[0], k[1], k[4]): metric(rs, "decode_ms_per_token") for k, rs in by.items() if not k[2]}
    order = list(dict.fromkeys((k[2], k[0], k[1]) for k in by))
    for key in sorted(by, key=lambda k: (k[4], order.index((k[2], k[0], k[1])) if k[2] else -1,
                                         budget_sort(k[3]))):
        method, cfg, line, budget, length = key
        rs = by[key]
        held, full = metric(rs, "kv_bytes"), metric(rs, "kv_full_bytes")
        ms = metric(rs, "decode_ms_per_token")
        base = full_ms.get((method, cfg, length))
        t.add(line or full_name(rs[0].label), budget or "all", length, fmt(held / 2**20 if held else None),
              f"{full / held:.2f}x" if held and full else "-", fmt(ms), fmt(base / ms if base and ms else None),
              fmt(metric(rs, "prefill_seconds")), len(rs))
    rep.table(t)
    _transformers_decode(rep, rows)


def _transformers_decode(rep: Report, rows: list[Row]) -> None:
    """The normal cache's decode under attnkit against transformers' own attention on the
    same cache (the ``transformers_*`` metrics of kv_decode's full rows)."""
    base = [r for r in rows if not r.cache and "transformers_decode_ms_per_token" in r.metrics]
    if not base:
        return
    t = Table("Decode with the normal cache: attnkit's attention vs transformers' own (same cache, same steps)",
              ["length", "attnkit ms/token", "transformers ms/token", "attnkit speedup", "n"])
    for length, rs in sorted(group(base, lambda r: r.length).items()):
        t.add(length, fmt(metric(rs, "decode_ms_per_token")), fmt(metric(rs, "transformers_decode_ms_per_token")),
              f"{fmt(metric(rs, 'decode_speedup_vs_transformers'))}x", len(rs))
    rep.table(t)
