"""The ``retrieval`` layout (accuracy by needle depth) and the KV-cache analysis of
retrieval tasks (accuracy by budget, with the full cache as reference)."""

from __future__ import annotations

import html

from ..store import Row
from ..tasks import Section
from .aggregate import (
    budget_sort,
    FULL_OK,
    case_of,
    depth_text,
    fails_note,
    fmt,
    full_name,
    full_solved,
    group,
    kept_percent,
    line_of,
    mean,
    method_labels,
    metric,
    reference,
    rows_of_layout,
)
from .kvbytes import acc_bytes, bytes_figure, bytes_share, compressed_text, share_text
from .multiples import curve, line_figure
from .page import Report, Table


def retrieval_layout(rep: Report, section: Section, rows: list[Row]) -> None:
    """Per (task, variant): accuracy by depth, a length x depth heatmap per method and
    accuracy vs depth (figures ``"heatmap"``, ``"vs_depth"``)."""
    groups = group(rows, lambda r: (r.task, r.variant))
    for (task, variant), rs in sorted(groups.items()):
        _retrieval_group(rep, section, task, variant, rs)


def _retrieval_group(rep: Report, section: Section, task: str, variant: str, rows: list[Row]) -> None:
    labels = method_labels(rows)
    depths = sorted({r.depth for r in rows if r.depth is not None})
    lengths = sorted({r.length for r in rows})
    name = task if variant == "default" else f"{task} / {variant}"
    by = group(rows, lambda r: (r.label, r.depth))
    fails = [fails_note(metric(by[("full", d)], "score")) if ("full", d) in by else "" for d in depths]
    t = Table(f"{name}: accuracy by depth (mean over lengths {', '.join(map(str, lengths))} and samples)",
              ["method"] + [depth_text(d) + f for d, f in zip(depths, fails)] + ["mean"]
              + (["mean (cases full solves)"] if any(fails) else []) + ["n"],
              note="full fails here: the full baseline's accuracy at that depth is below "
                   f"{FULL_OK:g}; compare methods on the cases full solves." if any(fails) else "")
    solved = full_solved(rows) or set()
    for label in labels:
        t.add(label, *[fmt(metric(by.get((label, d), []), "score")) for d in depths],
              fmt(metric([r for r in rows if r.label == label], "score")),
              *([fmt(metric([r for r in rows if r.label == label and case_of(r) in solved], "score"))]
                if any(fails) else []),
              len([r for r in rows if r.label == label]))
    rep.table(t)
    if "heatmap" in section.figures:
        _heatmap(rep, name, labels, depths, lengths, group(rows, lambda r: (r.label, r.length, r.depth)))
    if "vs_depth" in section.figures:
        _vs_depth(rep, name, labels, depths, by)


def _heatmap(rep: Report, name: str, labels: list[str], depths: list[float], lengths: list[int],
             cells: dict) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=[html.escape(x) for x in labels], shared_yaxes=True,
                        horizontal_spacing=0.04)
    for i, label in enumerate(labels, start=1):
        z = [[metric(cells.get((label, n, d), []), "score") for d in depths] for n in lengths]
        fig.add_trace(go.Heatmap(
            x=[depth_text(d) for d in depths], y=[str(n) for n in lengths], z=z, zmin=0, zmax=1,
            colorscale="RdYlGn", showscale=i == len(labels), xgap=2, ygap=2,
            text=[[fmt(v, 2) for v in row] for row in z], texttemplate="%{text}",
            hovertemplate=f"{html.escape(label)}<br>length %{{y}}<br>depth %{{x}}<br>accuracy %{{z:.2f}}<extra></extra>",
        ), row=1, col=i)
        fig.update_xaxes(title_text="depth", type="category", row=1, col=i)
    fig.update_yaxes(title_text="length (tokens)", type="category", row=1, col=1)
    fig.update_layout(title=f"{name}: accuracy heatmap (length x depth) per method", height=360 + 30 * len(lengths))
    rep.fig(fig)


def _vs_depth(rep: Report, name: str, labels: list[str], depths: list[float], by: dict) -> None:
    curves = [curve(label, [d * 100 for d in depths], [metric(by.get((label, d), []), "score") for d in depths])
              for label in labels]
    rep.fig(line_figure([c for c in curves if c["name"] != "full"], [c for c in curves if c["name"] == "full"],
                        f"{name}: accuracy vs depth", "needle depth (%)", "accuracy", y_range=[-0.05, 1.05],
                        height=360))


def cache_accuracy_section(rep: Report, rows: list[Row]) -> None:
    """Retrieval accuracy with compressed KV caches (every row, of every cache setting)."""
    groups = group([r for r in rows_of_layout(rows, "retrieval") if r.cache], lambda r: (r.task, r.variant))
    if not groups:
        return
    rep.h2("Accuracy with a compressed KV cache")
    rep.p("Each case is prefilled whole (question included), the cache is compressed to the budget, then the answer "
          "is generated (kvpress's setting). A budget is tokens kept per KV head and layer (512) or a share of the "
          "prompt kept (25% = kvpress compression_ratio 0.75); query-aware policies (quest, tokenselect, ...) keep "
          "every token and attend to the budget at each decode step. The full cache (transformers' DynamicCache) is "
          "the reference, measured on the same cases.")
    for (task, variant), cached in sorted(groups.items()):
        _cache_group(rep, rows, task, variant, cached)


def _cache_group(rep: Report, rows: list[Row], task: str, variant: str, cached: list[Row]) -> None:
    ref = reference(rows, cached, task, variant)
    name = task if variant == "default" else f"{task} / {variant}"
    budgets = sorted({r.budget for r in cached if r.budget}, key=budget_sort)
    lines = list(dict.fromkeys(line_of(r) for r in cached))
    refs = list(dict.fromkeys(r.label for r in ref))
    lengths = sorted({r.length for r in cached})
    by = group(cached, lambda r: (line_of(r), r.budget))
    t = Table(f"{name}: accuracy by KV budget (mean over depths, lengths {', '.join(map(str, lengths))} and samples)",
              ["cache", "all tokens"] + budgets + ["n"],
              note="'all tokens': the full cache, or a policy without a budget (quantized). In brackets: the bytes "
                   "held, % of the full cache's; 'holds N% of full': the policy keeps at least the full cache's "
                   "bytes, so its accuracy is no saving.")
    for label in refs:
        rs = [r for r in ref if r.label == label]
        t.add(full_name(label) + fails_note(metric(rs, "score")), fmt(metric(rs, "score")), *["-" for _ in budgets],
              len(rs))
    for line in lines:
        t.add(line, acc_bytes(by[(line, "")]) if (line, "") in by else "-",
              *[acc_bytes(by[(line, b)]) if (line, b) in by else "-" for b in budgets],
              sum(len(by.get((line, b), [])) for b in ["", *budgets]))
    rep.table(t)
    depths = sorted({r.depth for r in cached if r.depth is not None})
    t = Table(f"{name}: accuracy by depth and budget", ["cache", "budget"] + [depth_text(d) for d in depths]
              + ["mean", "KV kept", "n"], note="KV kept: bytes held after generation / bytes of a full cache of "
              "the same tokens (slot positions and the policy's state included), all layers; 'compressed layers': the same "
              "share on the layers the policy compresses, where the others hold a bounded cache (a model's window "
              "layers); 'holds N% of full': no saving.")
    cells = group(cached + ref, lambda r: (r.label, r.depth))
    for label in refs:
        rs = [r for r in ref if r.label == label]
        t.add(full_name(label), "all", *[fmt(metric(cells.get((label, d), []), "score"))
                                         + fails_note(metric(cells.get((label, d), []), "score")) for d in depths],
              fmt(metric(rs, "score")), "100%", len(rs))
    for line in lines:
        for b in ["", *budgets]:
            rs = by.get((line, b))
            if not rs:
                continue
            label = rs[0].label
            t.add(line, b or "all", *[fmt(metric(cells.get((label, d), []), "score")) for d in depths],
                  fmt(metric(rs, "score")), share_text(bytes_share(rs)) + compressed_text(rs), len(rs))
    rep.table(t)
    rep.fig(bytes_figure(name, lines, by, [(full_name(label), metric([r for r in ref if r.label == label], "score"))
                                           for label in refs]))
    kinds = {b.endswith("%") for b in budgets}
    if kinds == {False}:
        x_name, x_of = "tokens kept per KV head and layer", lambda rs: float(rs[0].budget)
    elif kinds == {True}:
        x_name, x_of = "share of the prompt kept (%)", lambda rs: float(rs[0].budget[:-1])
    else:
        x_name, x_of = "share of the prompt kept (%)", lambda rs: mean(kept_percent(r) for r in rs)
    xs: list[float] = []
    curves = []
    for line in lines:
        pts = sorted((x_of(by[(line, b)]), metric(by[(line, b)], "score")) for b in budgets if (line, b) in by)
        xs += [x for x, _ in pts]
        curves.append(curve(line, [x for x, _ in pts], [y for _, y in pts]))
    accs = [(full_name(label), metric([r for r in ref if r.label == label], "score")) for label in refs]
    lines_ref = [curve(n, [min(xs), max(xs)], [a, a], mode="lines", line={"dash": "dash"})
                 for n, a in accs if xs and a is not None]
    rep.fig(line_figure(curves, lines_ref, f"{name}: accuracy vs KV budget (dashed: the full cache)", x_name,
                        "accuracy", x_type="log" if kinds == {False} else "linear", y_range=[-0.05, 1.05]))
