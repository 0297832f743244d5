"""Reports of a run directory: ``report.md`` (tables) and ``report.html`` (tables + plots).

The HTML page is self-contained: plotly.js is inlined once, every figure is a div and a
``Plotly.newPlot`` call with its JSON, so the page opens offline. Every string that
comes from a config or a model answer is escaped (``html.escape`` in HTML, ``|`` in
Markdown, ``</`` inside inline JSON).

Sections: run and environment; retrieval accuracy (per task / variant: heatmap of
length x depth per method, accuracy vs depth); fidelity table; perplexity; model speed
(table and log-log prefill seconds vs length); accuracy-vs-speedup Pareto frontier;
KV-cache compression (accuracy vs budget per policy with the full cache as reference,
decode ms/token and KV bytes per policy x budget).

Rows measured with a KV-cache setting (``Row.cache``) appear only in the KV-cache
sections; the other sections read the rows of the normal cache.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

from .store import Row, Store

RETRIEVAL = ("niah", "passkey", "variable_tracking")


# --- aggregation --------------------------------------------------------------------------


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def _group(rows: list[Row], key) -> dict[Any, list[Row]]:
    out: dict[Any, list[Row]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return dict(out)


def _metric(rows: list[Row], name: str) -> Optional[float]:
    return _mean(r.metrics.get(name) if name != "score" else r.score for r in rows)


def _labels(rows: list[Row]) -> list[str]:
    """Method labels in first-seen order, 'full' first (the baseline)."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r.label, None)
    return sorted(seen, key=lambda label: (label != "full", list(seen).index(label)))


def _color(labels: list[str], label: str) -> str:
    """One color per method, the same in every figure."""
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf")
    if len(labels) > len(palette):  # more methods than the 10 classic colors: a 24-color palette
        from plotly.colors import qualitative

        palette = tuple(qualitative.Dark24)
    return palette[labels.index(label) % len(palette)]


def _variant_key(variant: str) -> tuple:
    """Sort 'layer2' before 'layer15'."""
    tail = variant.removeprefix("layer")
    return (0, int(tail), "") if tail.isdigit() else (1, 0, variant)


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _depth(d: Optional[float]) -> str:
    return "-" if d is None else f"{d * 100:.0f}%"


class Table:
    """A table rendered to both Markdown and HTML (cells escaped in each)."""

    def __init__(self, title: str, header: list[str], note: str = "") -> None:
        self.title, self.header, self.note = title, header, note
        self.rows: list[list[str]] = []

    def add(self, *cells: Any) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(cell(h) for h in self.header) + " |")
        lines.append("|" + "---|" * len(self.header))
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        note = f"<p class='note'>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3>{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Report:
    """Sections of tables and figures, rendered to Markdown and HTML."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[tuple[str, Any]] = []  # ("h2", text) | ("p", text) | ("table", Table) | ("fig", figure)

    def h2(self, text: str) -> None:
        self.parts.append(("h2", text))

    def p(self, text: str) -> None:
        self.parts.append(("p", text))

    def table(self, t: Table) -> None:
        self.parts.append(("table", t))

    def fig(self, figure: Any) -> None:
        self.parts.append(("fig", figure))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, item in self.parts:
            if kind == "h2":
                out += [f"## {item}", ""]
            elif kind == "p":
                out += [item, ""]
            elif kind == "table":
                out.append(item.markdown())
        out.append("Plots: see report.html in this folder.\n")
        return "\n".join(out)

    def html(self) -> str:
        body, n = [], 0
        for kind, item in self.parts:
            if kind == "h2":
                body.append(f"<h2>{html.escape(item)}</h2>")
            elif kind == "p":
                body.append(f"<p>{html.escape(item)}</p>")
            elif kind == "table":
                body.append(item.html())
            elif kind == "fig":
                n += 1
                body.append(_figure_html(item, f"fig{n}"))
        plotly_js = _plotly_js() if n else ""
        return (
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<style>{_CSS}</style>"
            f"<script type='text/javascript'>{plotly_js}</script></head>"
            f"<body><h1>{html.escape(self.title)}</h1>{''.join(body)}</body></html>\n"
        )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.plot { width: 100%; min-height: 380px; margin-bottom: 1.5em; }
.note { color: #555; font-size: 0.9em; }
"""


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().replace("</script", "<\\/script")


def _figure_html(fig: Any, div_id: str) -> str:
    import plotly.io as pio

    spec = pio.to_json(fig, validate=False)
    # Inline JSON inside <script>: "</" and "<!--" would end or confuse the script element.
    spec = spec.replace("</", "<\\/").replace("<!--", "<\\!--")
    return (f"<div id='{div_id}' class='plot'></div><script type='text/javascript'>"
            f"(function(){{var f={spec};Plotly.newPlot('{div_id}',f.data,f.layout,{{responsive:true}});}})();"
            "</script>")


# --- sections --------------------------------------------------------------------------------


def _run_section(rep: Report, store: Store, rows: list[Row]) -> None:
    runs = store.runs()
    rep.h2("Run")
    if runs:
        env = runs[-1]["environment"]
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(runs[0]["started"]))
        models = sorted({r.model for r in rows}) or [runs[-1]["config"].get("model", "?")]
        rep.p(f"Model: {', '.join(models)}. {len(rows)} results from {len(runs)} invocation(s), first started {started}.")
        t = Table("Environment", ["field", "value"])
        for key in ("cpu", "cpu_count", "torch_threads", "gpu", "python", "torch", "transformers", "attnkit",
                    "git_commit", "platform"):
            if env.get(key) is not None:
                t.add(key, env[key])
        if runs[-1].get("command"):
            t.add("command", runs[-1]["command"])
        rep.table(t)


def _retrieval_section(rep: Report, rows: list[Row]) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    groups = _group([r for r in rows if r.task in RETRIEVAL], lambda r: (r.task, r.variant))
    if not groups:
        return
    rep.h2("Retrieval accuracy")
    rep.p("Share of the asked values found in the greedy answer, by needle depth (0% = start of the context, "
          "100% = just before the question). A local method (sliding window, streaming) fails where the needle "
          "lies further back than its reach.")
    for (task, variant), group in sorted(groups.items()):
        labels = _labels(group)
        depths = sorted({r.depth for r in group if r.depth is not None})
        lengths = sorted({r.length for r in group})
        name = task if variant == "default" else f"{task} / {variant}"
        t = Table(f"{name}: accuracy by depth (mean over lengths {', '.join(map(str, lengths))} and samples)",
                  ["method"] + [_depth(d) for d in depths] + ["mean", "n"])
        by = _group(group, lambda r: (r.label, r.depth))
        for label in labels:
            t.add(label, *[_fmt(_metric(by.get((label, d), []), "score")) for d in depths],
                  _fmt(_metric([r for r in group if r.label == label], "score")),
                  len([r for r in group if r.label == label]))
        rep.table(t)
        cells = _group(group, lambda r: (r.label, r.length, r.depth))
        fig = make_subplots(rows=1, cols=len(labels), subplot_titles=[html.escape(x) for x in labels], shared_yaxes=True,
                            horizontal_spacing=0.04)
        for i, label in enumerate(labels, start=1):
            z = [[_metric(cells.get((label, n, d), []), "score") for d in depths] for n in lengths]
            fig.add_trace(go.Heatmap(
                x=[_depth(d) for d in depths], y=[str(n) for n in lengths], z=z, zmin=0, zmax=1,
                colorscale="RdYlGn", showscale=i == len(labels), xgap=2, ygap=2,
                text=[[_fmt(v, 2) for v in row] for row in z], texttemplate="%{text}",
                hovertemplate=f"{html.escape(label)}<br>length %{{y}}<br>depth %{{x}}<br>accuracy %{{z:.2f}}<extra></extra>",
            ), row=1, col=i)
            fig.update_xaxes(title_text="depth", type="category", row=1, col=i)
        fig.update_yaxes(title_text="length (tokens)", type="category", row=1, col=1)
        fig.update_layout(title=f"{name}: accuracy heatmap (length x depth) per method", height=360 + 30 * len(lengths))
        rep.fig(fig)
        line = go.Figure()
        for label in labels:
            line.add_trace(go.Scatter(x=[d * 100 for d in depths],
                                      y=[_metric(by.get((label, d), []), "score") for d in depths],
                                      mode="lines+markers", name=html.escape(label),
                                      line={"color": _color(labels, label)}))
        line.update_layout(title=f"{name}: accuracy vs depth", xaxis_title="needle depth (%)",
                           yaxis_title="accuracy", yaxis_range=[-0.05, 1.05], height=360)
        rep.fig(line)


def _fidelity_section(rep: Report, rows: list[Row]) -> None:
    group = [r for r in rows if r.task == "fidelity"]
    if not group:
        return
    rep.h2("Fidelity on captured activations")
    t = Table("Fidelity against exact attention (q, k, v captured from the model on real text)",
              ["method", "layer", "length", "rel. error", "mass recall", "density", "method s", "n"],
              note="rel. error = ||o - o*|| / ||o*||; mass recall = share of the exact softmax mass inside the "
                   "method's allowed set; density = allowed / causal pairs.")
    labels = _labels(group)
    by = _group(group, lambda r: (r.label, r.variant, r.length))
    for (label, variant, length) in sorted(by, key=lambda k: (labels.index(k[0]), _variant_key(k[1]), k[2])):
        rs = by[(label, variant, length)]
        t.add(label, variant.removeprefix("layer"), length, _fmt(_metric(rs, "rel_error")),
              _fmt(_metric(rs, "recall")), _fmt(_metric(rs, "density")), _fmt(_metric(rs, "method_seconds")), len(rs))
    rep.table(t)
    points = fidelity_points(group)
    if len({p["label"] for p in points}) > 1:
        _error_density_figures(rep, points)
    verdicts = equal_density_comparison(points)
    if verdicts:
        t = Table("Against the static baseline at equal density",
                  ["method", "length", "density", "rel. error", f"{BASELINE} error at that density", "lower error"],
                  note=f"{BASELINE}'s error at a method's density is interpolated (linear in log density) between "
                       f"the {BASELINE} windows measured; errors and densities are means over the layers. "
                       "Content-aware selection should beat position-only selection at equal cost.")
        for v in verdicts:
            t.add(v["label"], v["length"], _fmt(v["density"]), _fmt(v["rel_error"]), _fmt(v["baseline_error"]),
                  "yes" if v["better"] else "NO")
        rep.table(t)


BASELINE = "streaming"  # the static pattern every dynamic method is compared with at equal density


def fidelity_points(rows: list[Row]) -> list[dict[str, Any]]:
    """Per (method label, length): the method name, mean density, mean rel. error and mean
    mass recall over the layers measured (fidelity rows)."""
    by = _group([r for r in rows if r.task == "fidelity"], lambda r: (r.label, r.length))
    points = []
    for (label, length), rs in by.items():
        density, error = _metric(rs, "density"), _metric(rs, "rel_error")
        if density is not None and error is not None:
            points.append({"label": label, "method": rs[0].method, "length": length, "density": density,
                           "rel_error": error, "recall": _metric(rs, "recall")})
    return points


def baseline_error_at(points: list[dict[str, Any]], length: int, density: float) -> Optional[float]:
    """The BASELINE's rel. error at ``density`` (log-linear interpolation between its
    measured settings at ``length``); None outside the measured range."""
    base = sorted((p["density"], p["rel_error"]) for p in points if p["method"] == BASELINE and p["length"] == length)
    if len(base) < 2 or density <= 0:
        return None
    if density < base[0][0] or density > base[-1][0]:
        return None
    for (d0, e0), (d1, e1) in zip(base, base[1:]):
        if d0 <= density <= d1:
            if d1 == d0:
                return min(e0, e1)
            w = (math.log(density) - math.log(d0)) / (math.log(d1) - math.log(d0))
            return e0 + w * (e1 - e0)
    return None


def equal_density_comparison(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every method other than the baseline (and ``full``): its error next to the
    baseline's at the same density, and whether it is lower."""
    out = []
    for p in sorted(points, key=lambda p: (p["method"], p["length"], p["density"])):
        if p["method"] in (BASELINE, "full"):
            continue
        ref = baseline_error_at(points, p["length"], p["density"])
        if ref is not None:
            out.append({**p, "baseline_error": ref, "better": p["rel_error"] < ref})
    return out


def _line_name(point: dict[str, Any]) -> str:
    """The curve a point belongs to: its method, apart for a trained estimator (``estimator=``),
    which is a different method in effect from the same method's training-free default."""
    return point["method"] + (" (trained)" if "estimator=" in point["label"] else "")


def _error_density_figures(rep: Report, points: list[dict[str, Any]]) -> None:
    """One error-vs-density figure per length, one line per method (its settings sorted by density)."""
    import plotly.graph_objects as go

    names = sorted({_line_name(p) for p in points}, key=lambda m: (m != BASELINE, m))
    for length in sorted({p["length"] for p in points}):
        fig = go.Figure()
        for name in names:
            ps = sorted((p for p in points if _line_name(p) == name and p["length"] == length), key=lambda p: p["density"])
            if not ps:
                continue
            fig.add_trace(go.Scatter(x=[p["density"] for p in ps], y=[p["rel_error"] for p in ps], mode="lines+markers",
                                     name=html.escape(name), text=[html.escape(p["label"]) for p in ps],
                                     hovertemplate="%{text}<br>density %{x:.3f}<br>error %{y:.3f}<extra></extra>",
                                     line={"color": _color(names, name), "dash": "dash" if name == BASELINE else None}))
        fig.update_layout(title=f"Relative output error vs density at {length} tokens (lower-left is better)",
                          xaxis_title="density (allowed / causal pairs)",
                          yaxis_title="relative output error (log; exact points fall below)",
                          xaxis_type="log", yaxis_type="log", yaxis_range=[math.log10(0.003), math.log10(3.0)],
                          height=460)
        rep.fig(fig)


def _perplexity_section(rep: Report, rows: list[Row]) -> None:
    group = [r for r in rows if r.task == "perplexity"]
    if not group:
        return
    rep.h2("Perplexity")
    t = Table("Token-level perplexity of real text (lower is better)",
              ["method", "text", "length", "perplexity", "first half", "second half", "n"])
    labels = _labels(group)
    by = _group(group, lambda r: (r.label, r.variant, r.length))
    for (label, variant, length) in sorted(by, key=lambda k: (labels.index(k[0]), k[1], k[2])):
        rs = by[(label, variant, length)]
        t.add(label, variant, length, _fmt(_metric(rs, "perplexity"), 4), _fmt(_metric(rs, "perplexity_first_half"), 4),
              _fmt(_metric(rs, "perplexity_second_half"), 4), len(rs))
    rep.table(t)


def _speed_section(rep: Report, rows: list[Row]) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    group = [r for r in rows if r.task == "model_speed"]
    if not group:
        return
    rep.h2("Model speed and memory")
    labels = _labels(group)
    by = _group(group, lambda r: (r.label, r.length))
    t = Table("Prefill, decode and KV cache (means over samples)",
              ["method", "length", "prefill s", "speedup vs full", "decode ms/token", "KV cache MiB", "n"])
    full = {n: _metric(rs, "prefill_seconds") for (label, n), rs in by.items() if label == "full"}
    for (label, length) in sorted(by, key=lambda k: (labels.index(k[0]), k[1])):
        rs = by[(label, length)]
        pre = _metric(rs, "prefill_seconds")
        speedup = full.get(length) / pre if full.get(length) and pre else None
        kv = _metric(rs, "kv_cache_bytes")
        t.add(label, length, _fmt(pre), _fmt(speedup), _fmt(_metric(rs, "decode_ms_per_token")),
              _fmt(kv / 2**20 if kv is not None else None), len(rs))
    rep.table(t)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["prefill seconds", "decode ms / token"])
    for label in labels:
        lengths = sorted(n for (lab, n) in by if lab == label)
        fig.add_trace(go.Scatter(x=lengths, y=[_metric(by[(label, n)], "prefill_seconds") for n in lengths],
                                 mode="lines+markers", name=html.escape(label), legendgroup=label,
                                 line={"color": _color(labels, label)}), row=1, col=1)
        fig.add_trace(go.Scatter(x=lengths, y=[_metric(by[(label, n)], "decode_ms_per_token") for n in lengths],
                                 mode="lines+markers", name=html.escape(label), legendgroup=label, showlegend=False,
                                 line={"color": _color(labels, label)}), row=1, col=2)
    fig.update_xaxes(type="log", title_text="length (tokens)")
    fig.update_yaxes(type="log")
    fig.update_layout(title="Speed vs length (log-log)", height=400)
    rep.fig(fig)


def pareto_points(rows: list[Row]) -> tuple[list[dict[str, Any]], str, str]:
    """Per method: (speedup, accuracy) and what each axis measured.

    speedup: full's prefill seconds / the method's, geometric mean over lengths measured
    for both (model_speed); without speed rows, 1 / density (fidelity). accuracy: mean
    retrieval accuracy; without retrieval rows, mean mass recall (fidelity).
    """
    speed = _group([r for r in rows if r.task == "model_speed"], lambda r: (r.label, r.length))
    retrieval = [r for r in rows if r.task in RETRIEVAL]
    fidelity = [r for r in rows if r.task == "fidelity"]
    x_name = "prefill speedup vs full" if speed else "1 / density"
    y_name = "retrieval accuracy" if retrieval else "attention-mass recall"
    points = []
    for label in _labels(rows):
        if speed:
            ratios = []
            for (lab, n), rs in speed.items():
                if lab == label and ("full", n) in speed:
                    a, b = _metric(speed[("full", n)], "prefill_seconds"), _metric(rs, "prefill_seconds")
                    if a and b:
                        ratios.append(math.log(a / b))
            x = math.exp(sum(ratios) / len(ratios)) if ratios else None
        else:
            density = _metric([r for r in fidelity if r.label == label], "density")
            x = 1 / density if density else None
        if retrieval:
            y = _metric([r for r in retrieval if r.label == label], "score")
        else:
            y = _metric([r for r in fidelity if r.label == label], "recall")
        if x is not None and y is not None:
            points.append({"label": label, "speedup": x, "accuracy": y})
    for p in points:
        p["frontier"] = not any(q is not p and q["speedup"] >= p["speedup"] and q["accuracy"] >= p["accuracy"]
                                and (q["speedup"] > p["speedup"] or q["accuracy"] > p["accuracy"]) for q in points)
    return points, x_name, y_name


def _pareto_section(rep: Report, rows: list[Row]) -> None:
    import plotly.graph_objects as go

    points, x_name, y_name = pareto_points(rows)
    if not points:
        return
    rep.h2("Accuracy vs speedup")
    t = Table("Pareto frontier", ["method", x_name, y_name, "on frontier"])
    for p in sorted(points, key=lambda p: -p["speedup"]):
        t.add(p["label"], _fmt(p["speedup"]), _fmt(p["accuracy"]), "yes" if p["frontier"] else "")
    rep.table(t)
    fig = go.Figure()
    front = sorted((p for p in points if p["frontier"]), key=lambda p: p["speedup"])
    fig.add_trace(go.Scatter(x=[p["speedup"] for p in front], y=[p["accuracy"] for p in front], mode="lines",
                             line={"dash": "dot", "color": "#888"}, name="frontier", line_shape="hv"))
    labels = [p["label"] for p in points]
    for p in points:
        fig.add_trace(go.Scatter(x=[p["speedup"]], y=[p["accuracy"]], mode="markers+text", name=html.escape(p["label"]),
                                 text=[html.escape(p["label"])], textposition="top center",
                                 marker={"size": 12, "color": _color(labels, p["label"])}, cliponaxis=False))
    fig.update_layout(title="Accuracy vs speedup (Pareto frontier: up and right is better)", xaxis_title=x_name,
                      yaxis_title=y_name, xaxis_type="log", height=420)
    rep.fig(fig)


# --- KV-cache settings ------------------------------------------------------------------------


def _budget_sort(text: str) -> tuple:
    """Token budgets ascending, then percentages ascending, then no budget."""
    if not text:
        return (2, 0.0)
    if text.endswith("%"):
        return (1, float(text[:-1]))
    return (0, float(text))


def _line(r: Row) -> str:
    """The curve a row belongs to: its label without the budget (``snapkv``), or the
    method's label for a row of the normal cache (the reference)."""
    suffix = f"@{r.budget}" if r.budget else ""
    return r.label[: len(r.label) - len(suffix)] if suffix and r.label.endswith(suffix) else r.label


def _reference(rows: list[Row], cached: list[Row], task: str, variant: str) -> list[Row]:
    """Rows of the normal cache for the cases (and prefill methods) measured with a cache."""
    cases = {(r.method, r.config, r.length, r.depth, r.sample) for r in cached}
    return [r for r in rows if not r.cache and r.task == task and r.variant == variant
            and (r.method, r.config, r.length, r.depth, r.sample) in cases]


def _full_name(label: str) -> str:
    return "full cache" if label == "full" else f"{label} (full cache)"


def _kept_percent(r: Row) -> float | None:
    """Share of the prompt a row's budget keeps, in percent (tokens / prompt tokens)."""
    if r.budget.endswith("%"):
        return float(r.budget[:-1])
    prompt = r.metrics.get("prompt_tokens") or r.metrics.get("context_tokens") or r.length
    return min(100.0, 100 * float(r.budget) / prompt) if r.budget and prompt else None


def _cache_accuracy_section(rep: Report, rows: list[Row]) -> None:
    import plotly.graph_objects as go

    groups = _group([r for r in rows if r.cache and r.task in RETRIEVAL], lambda r: (r.task, r.variant))
    if not groups:
        return
    rep.h2("Accuracy with a compressed KV cache")
    rep.p("Each case is prefilled whole (question included), the cache is compressed to the budget, then the answer "
          "is generated (kvpress's setting). A budget is tokens kept per KV head and layer (512) or a share of the "
          "prompt kept (25% = kvpress compression_ratio 0.75); query-aware policies (quest, tokenselect, ...) keep "
          "every token and attend to the budget at each decode step. The full cache (transformers' DynamicCache) is "
          "the reference, measured on the same cases.")
    for (task, variant), cached in sorted(groups.items()):
        ref = _reference(rows, cached, task, variant)
        name = task if variant == "default" else f"{task} / {variant}"
        budgets = sorted({r.budget for r in cached if r.budget}, key=_budget_sort)
        lines = list(dict.fromkeys(_line(r) for r in cached))
        refs = list(dict.fromkeys(r.label for r in ref))
        lengths = sorted({r.length for r in cached})
        by = _group(cached, lambda r: (_line(r), r.budget))
        t = Table(f"{name}: accuracy by KV budget (mean over depths, lengths {', '.join(map(str, lengths))} and samples)",
                  ["cache", "all tokens"] + budgets + ["n"],
                  note="'all tokens': the full cache, or a policy without a budget (quantized).")
        for label in refs:
            rs = [r for r in ref if r.label == label]
            t.add(_full_name(label), _fmt(_metric(rs, "score")), *["-" for _ in budgets], len(rs))
        for line in lines:
            t.add(line, _fmt(_metric(by.get((line, ""), []), "score")) if (line, "") in by else "-",
                  *[_fmt(_metric(by[(line, b)], "score")) if (line, b) in by else "-" for b in budgets],
                  sum(len(by.get((line, b), [])) for b in ["", *budgets]))
        rep.table(t)
        depths = sorted({r.depth for r in cached if r.depth is not None})
        t = Table(f"{name}: accuracy by depth and budget", ["cache", "budget"] + [_depth(d) for d in depths]
                  + ["mean", "KV kept", "n"], note="KV kept: bytes held after generation / bytes of a full cache of "
                  "the same tokens (slot positions and the policy's state included).")
        cells = _group(cached + ref, lambda r: (r.label, r.depth))
        for label in refs:
            rs = [r for r in ref if r.label == label]
            t.add(_full_name(label), "all", *[_fmt(_metric(cells.get((label, d), []), "score")) for d in depths],
                  _fmt(_metric(rs, "score")), "100%", len(rs))
        for line in lines:
            for b in ["", *budgets]:
                rs = by.get((line, b))
                if not rs:
                    continue
                label = rs[0].label
                held, full = _metric(rs, "kv_bytes"), _metric(rs, "kv_full_bytes")
                t.add(line, b or "all", *[_fmt(_metric(cells.get((label, d), []), "score")) for d in depths],
                      _fmt(_metric(rs, "score")), f"{100 * held / full:.1f}%" if held and full else "-", len(rs))
        rep.table(t)
        kinds = {b.endswith("%") for b in budgets}
        if kinds == {False}:
            x_name, x_of = "tokens kept per KV head and layer", lambda rs: float(rs[0].budget)
        elif kinds == {True}:
            x_name, x_of = "share of the prompt kept (%)", lambda rs: float(rs[0].budget[:-1])
        else:
            x_name, x_of = "share of the prompt kept (%)", lambda rs: _mean(_kept_percent(r) for r in rs)
        fig = go.Figure()
        xs = []
        colors = lines + refs
        for line in lines:
            pts = sorted((x_of(by[(line, b)]), _metric(by[(line, b)], "score")) for b in budgets if (line, b) in by)
            xs += [x for x, _ in pts]
            fig.add_trace(go.Scatter(x=[x for x, _ in pts], y=[y for _, y in pts], mode="lines+markers",
                                     name=html.escape(line), line={"color": _color(colors, line)}))
        for label in refs:
            acc = _metric([r for r in ref if r.label == label], "score")
            if xs and acc is not None:
                fig.add_trace(go.Scatter(x=[min(xs), max(xs)], y=[acc, acc], mode="lines",
                                         name=html.escape(_full_name(label)),
                                         line={"dash": "dash", "color": "#444" if label == "full" else
                                               _color(colors, label)}))
        fig.update_layout(title=f"{name}: accuracy vs KV budget (dashed: the full cache)", xaxis_title=x_name,
                          yaxis_title="accuracy", yaxis_range=[-0.05, 1.05], height=400,
                          xaxis_type="log" if kinds == {False} else "linear")
        rep.fig(fig)


def _kv_decode_section(rep: Report, rows: list[Row]) -> None:
    group = [r for r in rows if r.task == "kv_decode"]
    if not group:
        return
    rep.h2("KV-cache decode speed and memory")
    t = Table("Decode ms/token (median of timed steps, warm-up excluded) and KV bytes, per policy x budget",
              ["cache", "budget", "context", "KV MiB", "full / KV", "decode ms/token", "speedup vs full",
               "prefill s", "n"],
              note="KV bytes after the decode steps (attnkit caches: keys, values, slot positions, policy state and "
                   "observation window); full / KV: bytes of a full cache of the same tokens over the bytes held.")
    by = _group(group, lambda r: (r.method, r.config, _line(r) if r.cache else "", r.budget, r.length))
    full_ms = {(k[0], k[1], k[4]): _metric(rs, "decode_ms_per_token") for k, rs in by.items() if not k[2]}
    order = list(dict.fromkeys((k[2], k[0], k[1]) for k in by))
    for key in sorted(by, key=lambda k: (k[4], order.index((k[2], k[0], k[1])) if k[2] else -1,
                                         _budget_sort(k[3]))):
        method, cfg, line, budget, length = key
        rs = by[key]
        held, full = _metric(rs, "kv_bytes"), _metric(rs, "kv_full_bytes")
        ms = _metric(rs, "decode_ms_per_token")
        base = full_ms.get((method, cfg, length))
        t.add(line or _full_name(rs[0].label), budget or "all", length, _fmt(held / 2**20 if held else None),
              f"{full / held:.2f}x" if held and full else "-", _fmt(ms), _fmt(base / ms if base and ms else None),
              _fmt(_metric(rs, "prefill_seconds")), len(rs))
    rep.table(t)


def _errors_section(rep: Report, store: Store) -> None:
    """Failures that no later run has measured (a retry that succeeded clears its failure)."""
    cur = store.conn.execute("SELECT task, label, error FROM errors WHERE key NOT IN (SELECT key FROM results) ORDER BY id")
    errs = cur.fetchall()
    if not errs:
        return
    rep.h2("Failed measurements")
    t = Table(f"{len(errs)} failed (retried by running the same command again)", ["task", "method", "error"])
    for task, label, error in errs[-50:]:
        t.add(task, label, error[:300])
    rep.table(t)


def build(run_dir: str | Path) -> Report:
    """The Report of a run directory (reads ``results.sqlite``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.sqlite").is_file():
        raise FileNotFoundError(f"{run_dir} has no results.sqlite: run `attnkit bench --out {run_dir}` first")
    with Store(run_dir) as store:
        rows = store.rows()
        plain = [r for r in rows if not r.cache and r.task != "kv_decode"]
        rep = Report(f"attnkit benchmark: {run_dir.name}")
        _run_section(rep, store, rows)
        _retrieval_section(rep, plain)
        _fidelity_section(rep, plain)
        _perplexity_section(rep, plain)
        _speed_section(rep, plain)
        _pareto_section(rep, plain)
        _cache_accuracy_section(rep, rows)
        _kv_decode_section(rep, rows)
        _errors_section(rep, store)
    return rep


def write(run_dir: str | Path, figures: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``run_dir``; returns their paths.

    ``figures``: also write every plot as an SVG file into this folder (for docs; needs
    the ``kaleido`` package and a Chrome/Chromium on the machine)."""
    run_dir = Path(run_dir)
    rep = build(run_dir)
    md, page = run_dir / "report.md", run_dir / "report.html"
    md.write_text(rep.markdown(), encoding="utf-8")
    page.write_text(rep.html(), encoding="utf-8")
    if figures is not None:
        write_svgs(rep, Path(figures))
    return md, page


def figure_slug(fig: Any, index: int) -> str:
    """A file name for a figure: its number and a slug of its title."""
    title = (fig.layout.title.text or "figure") if fig.layout.title else "figure"
    slug = "".join(c if c.isalnum() else "-" for c in title.lower())
    slug = "-".join(part for part in slug.split("-") if part)[:60].strip("-")
    return f"{index:02d}-{slug}.svg"


def write_svgs(rep: Report, folder: Path) -> list[Path]:
    """Every figure of ``rep`` as ``folder/NN-title.svg``; returns the paths."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise ImportError("writing figures as SVG needs the kaleido package (pip install kaleido) and a "
                          "Chrome/Chromium browser") from None
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    figs = [item for kind, item in rep.parts if kind == "fig"]
    for i, fig in enumerate(figs, 1):
        path = folder / figure_slug(fig, i)
        static = _static_figure(fig)
        static.write_image(str(path), format="svg", width=900, height=static.layout.height)
        paths.append(path)
    return paths


def _static_figure(fig: Any) -> Any:
    """A copy of ``fig`` for a static image: the legend below the plot (long method
    labels would squeeze it) and trace names escaped once, not for HTML and SVG both."""
    import plotly.graph_objects as go

    static = go.Figure(fig)
    for trace in static.data:
        if trace.name:
            trace.name = html.escape(html.unescape(trace.name), quote=False)
    rows = sum(1 for t in static.data if t.showlegend is not False)
    below = 20 * rows + 70  # one legend line per trace under the x axis title
    static.update_layout(legend={"yanchor": "top", "y": -70 / (fig.layout.height or 450), "xanchor": "left", "x": 0},
                         height=(fig.layout.height or 450) + below, margin={"b": below + 10})
    return static


def summary_json(run_dir: str | Path) -> str:
    """One JSON line of headline numbers per (task, method) for scripts."""
    with Store(run_dir) as store:
        rows = store.rows()
    out = {f"{task}/{label}": _metric(rs, "score") for (task, label), rs in _group(rows, lambda r: (r.task, r.label)).items()}
    return json.dumps(out, sort_keys=True)
