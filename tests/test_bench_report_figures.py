"""The report's figures: decade ticks on log axes, one colour per method across figures,
complete legends (also in static SVGs), small multiples for many methods."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from attnkit.bench import report
from attnkit.bench.report.aggregate import GREYS
from attnkit.bench.report.style import legend_entries, log_tick_labels
from attnkit.bench.report.svg import _static_figure
from attnkit.bench.store import Row, Store

LENGTHS = (1000, 4000, 16000, 64000, 256000)


def _methods(n: int) -> list[str]:
    return ["full"] + [f"m{i}" for i in range(1, n)]


def _fill(run_dir: Path, n: int = 3) -> None:
    """Rows of several sections, lengths over several decades; ``n`` methods with ``full``."""
    with Store(run_dir) as store:
        store.start_run({"model": "m"}, command="attnkit bench")
        for i, label in enumerate(_methods(n)):
            base = dict(model="m", method=label, config="{}", label=label)
            for length in LENGTHS:
                for depth in (0.0, 1.0):
                    acc = 1.0 if label == "full" or depth else 0.0
                    store.add(Row(task="niah", variant="single", length=length, depth=depth, sample=0, score=acc,
                                  metrics={"score": acc}, **base))
                s = length / 1000 * (1.0 if label == "full" else 0.5)
                store.add(Row(task="model_speed", variant="default", length=length, depth=None, sample=0, score=s,
                              metrics={"prefill_seconds": s, "decode_ms_per_token": 20.0 + i,
                                       "kv_cache_bytes": 1e3 * length}, **base))
                d = 1.0 if label == "full" else 0.01 * (i + 1)
                store.add(Row(task="fidelity", variant="layer2", length=length, depth=None, sample=0, score=0.1,
                              metrics={"rel_error": 0.3 / (i + 1) if label != "full" else 1e-6, "recall": 0.9,
                                       "density": d}, **base))
            for budget, kept in (("512", 0.2), ("2048", 0.6)):
                store.add(Row(model="m", task="niah", variant="single", method="full", config="{}",
                              label=f"snapkv@{budget}", length=4000, depth=0.5, sample=0, score=0.5,
                              metrics={"score": 0.5, "kv_bytes": kept, "kv_full_bytes": 1.0},
                              cache="snapkv", budget=budget)) if label == "full" else None


def _figs(run_dir: Path) -> list:
    rep = report.build(run_dir)
    return [item for kind, item in rep.parts if kind == "fig"]


@pytest.fixture(scope="module")
def figs(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    _fill(run_dir)
    return _figs(run_dir)


def _is_decade(text: str) -> bool:
    if text.startswith("10<sup>"):
        return text[7:].removesuffix("</sup>").lstrip("-").isdigit()
    k = math.log10(float(text))
    return abs(k - round(k)) < 1e-9


def test_every_log_axis_is_labelled_at_decades_only(figs):
    axes = [(fig.layout.title.text, key, ticks) for fig in figs for key, ticks in log_tick_labels(fig).items()]
    assert len(axes) >= 4  # speed (x and y), error vs density, pareto, KV budget
    for title, key, ticks in axes:
        assert len(ticks) >= 2, (title, key)
        assert all(_is_decade(t) for t in ticks), (title, key, ticks)


def test_one_colour_per_method_across_figures(figs):
    colours: dict[str, set[str]] = {}
    for fig in figs:
        for trace in fig.data:
            if trace.type == "heatmap" or not trace.name or trace.name == "frontier":
                continue
            c = trace.line.color if trace.mode and "lines" in trace.mode else trace.marker.color
            colours.setdefault(trace.name.removesuffix(" (full cache)").replace("full cache", "full"), set()).add(c)
    assert len(colours) >= 4
    assert {name: cs for name, cs in colours.items() if len(cs) != 1} == {}
    assert colours["full"] == {"#444444"}
    others = [next(iter(cs)) for name, cs in colours.items() if name != "full"]
    assert len(set(others)) == len(others)  # different methods, different colours


def test_every_method_drawn_has_a_legend_entry_also_in_svg(figs):
    for fig in figs:
        names = {t.name for t in fig.data if t.type != "heatmap" and t.name}
        if not names:
            continue
        assert fig.layout.showlegend is True
        assert set(legend_entries(fig)) == names, fig.layout.title.text
        static = _static_figure(fig)
        assert set(legend_entries(static)) == names
        # room below the plot for one legend line per entry
        assert static.layout.margin.b >= 20 * len(names) + 70


def test_ten_methods_are_drawn_as_small_multiples(tmp_path):
    _fill(tmp_path, n=10)
    figs = _figs(tmp_path)
    lines = [f for f in figs if any(t.type == "scatter" for t in f.data) and "Pareto" not in (f.layout.title.text or "")
             and "KV budget" not in f.layout.title.text
             and "bytes held" not in f.layout.title.text]
    assert len(lines) >= 4  # accuracy vs depth, error vs density per length, prefill and decode vs length
    for fig in lines:
        panels = [k for k in fig.layout.to_plotly_json() if k.startswith("xaxis")]
        drawn = {t.name for t in fig.data} - {"full", "streaming"}
        assert len(panels) >= len(drawn) == 9, fig.layout.title.text
        per_panel: dict[str, set[str]] = {}
        for t in fig.data:
            per_panel.setdefault(t.xaxis, set()).add(t.name)
        assert all("full" in names and len(names - {"full"}) == 1 for names in per_panel.values())
        assert all(t.line.color == "#444444" for t in fig.data if t.name == "full")
        # grey is the full baseline's: no method is drawn in a grey
        assert not {t.line.color for t in fig.data if t.name != "full"} & {"#444444", *GREYS}


def _store(run_dir: Path, rows: list[Row]) -> str:
    with Store(run_dir) as store:
        store.start_run({"model": "m"}, command="attnkit bench")
        for r in rows:
            store.add(r)
    return report.build(run_dir).markdown()


def _row(task: str, label: str, score: float, length: int = 4096, depth: float | None = None, variant: str = "default",
         **metrics: float) -> Row:
    return Row(model="m", task=task, variant=variant, method=label.split("(")[0], config="{}", label=label,
               length=length, depth=depth, sample=0, score=score, metrics={"score": score, **metrics})


def test_density_pareto_names_its_axes_and_flags_dense_settings(tmp_path):
    rows = [_row("fidelity", "full", 0.0, variant="layer2", rel_error=0.0, recall=1.0, density=1.0),
            _row("fidelity", "moba", 0.1, variant="layer2", rel_error=0.1, recall=0.99, density=0.9995),
            _row("fidelity", "vs", 0.2, variant="layer2", rel_error=0.2, recall=0.9, density=0.1),
            _row("fidelity", "streaming(window=64)", 0.6, variant="layer2", rel_error=0.6, recall=0.5, density=0.05),
            _row("fidelity", "streaming(window=4096)", 0.3, variant="layer2", rel_error=0.05, recall=0.99,
                 density=1.0)]
    md = _store(tmp_path, rows)
    assert "## Attention-mass recall vs 1 / density (sparsity)" in md
    assert "Accuracy vs speedup" not in md
    assert "1 / density (sparsity, not a measured speedup)" in md
    points, _, _ = report.pareto_points(rows)
    by = {p["label"]: p for p in points}
    assert by["moba"]["dense"] and not by["moba"]["frontier"] and not by["full"]["frontier"]
    assert by["vs"]["frontier"] and not by["vs"]["dense"]
    assert "| moba (dense) |" in md and "no (dense)" in md
    assert "1 (dense)" in md  # the fidelity table marks dense densities
    verdicts = {v["label"] for v in report.equal_density_comparison(report.fidelity_points(rows))}
    assert "moba" not in verdicts  # never "lower error than streaming" when dense


def test_retrieval_compares_only_where_full_succeeds(tmp_path):
    rows = []
    for depth, full_acc in ((0.0, 1.0), (1.0, 0.0)):
        rows += [_row("niah", "full", full_acc, depth=depth, variant="single"),
                 _row("niah", "vs", 1.0, depth=depth, variant="single")]
    rows += [_row("model_speed", label, s, prefill_seconds=s) for label, s in (("full", 2.0), ("vs", 1.0))]
    md = _store(tmp_path, rows)
    assert "100% (full fails here)" in md and "| 0% (full fails here)" not in md
    assert "| vs | 1 | 1 | 1 | 1 | 2 |" in md  # mean, then mean over the cases full solves
    points, _, y_name = report.pareto_points(rows)
    assert y_name == "retrieval accuracy (cases full solves)"
    assert {p["label"]: p["accuracy"] for p in points} == {"full": 1.0, "vs": 1.0}  # the failed case left out


def test_kv_cache_accuracy_is_read_against_bytes_held(tmp_path):
    rows = []
    for depth in (0.25, 0.75):
        rows.append(_row("niah", "full", 1.0, depth=depth, variant="single"))
        for cache, budget, held in (("snapkv", "512", 0.25), ("tokenselect", "512", 1.02)):
            r = _row("niah", f"full@{budget}", 1.0, depth=depth, variant="single", kv_bytes=held * 1000,
                     kv_full_bytes=1000.0)
            r.method, r.cache, r.budget, r.label = "full", cache, budget, f"{cache}@{budget}"
            rows.append(r)
    rows.append(_row("model_speed", "full", 1.0, prefill_seconds=1.0, transformers_prefill_seconds=2.0))
    with Store(tmp_path) as store:
        store.start_run({"model": "m"}, command="attnkit bench")
        for r in rows:
            store.add(r)
    rep = report.build(tmp_path)
    md = rep.markdown()
    assert "| snapkv | - | 1 (25% bytes) |" in md
    assert "| tokenselect | - | 1 (holds 102% of full) |" in md
    assert "holds 102% of full" in md.split("accuracy by depth and budget")[1]
    figs = [item for kind, item in rep.parts if kind == "fig"]
    fig = next(f for f in figs if "accuracy vs bytes held (% of the full cache" in f.layout.title.text)
    token = next(t for t in fig.data if t.name == "tokenselect")
    assert list(token.x) == [pytest.approx(102.0)] and list(token.marker.symbol) == ["x"]
    assert "holds 102% of full" in token.text[0]
    # never a win: the headline's smallest cache that kept accuracy is snapkv, not tokenselect
    assert "The smallest KV cache that kept its accuracy: `KV cache snapkv@512`" in md
    assert "KV cache tokenselect@512 | - | - | - | 1 | 0.0 MiB (holds 102% of full)" in md


def test_speedups_within_timing_noise_are_flagged(tmp_path):
    def speed(label: str, median: float, lo: float, hi: float, length: int) -> Row:
        return _row("model_speed", label, median, length=length, prefill_seconds=median, prefill_seconds_min=lo,
                    prefill_seconds_max=hi, repeats=3.0)

    rows = [speed("full", 2.0, 1.98, 2.02, 1024), speed("steady", 1.0, 0.99, 1.01, 1024),
            speed("jumpy", 1.0, 0.8, 1.3, 1024),  # 50% spread
            speed("full", 2.0, 1.9, 2.1, 2048), speed("close", 1.9, 1.85, 1.95, 2048)]  # 5% spreads, range has 1.0
    md = _store(tmp_path, rows)
    table = md.split("Prefill, decode and KV cache")[1]
    assert "| steady | 1024 | 1 | 2% | 2 |" in table
    assert "| jumpy | 1024 | 1 | 50% | 2 (noisy!) |" in table
    assert "| close | 2048 | 1.9 | 5% | 1.05 (noisy!) |" in table
    assert "within timing noise" in table


def test_headline_speedup_within_timing_noise_is_flagged(tmp_path):
    full = _row("model_speed", "full", 1.0, prefill_seconds=1.0, prefill_seconds_min=0.7, prefill_seconds_max=1.2,
                transformers_prefill_seconds=1.1, transformers_prefill_seconds_min=1.05,
                transformers_prefill_seconds_max=1.15)
    md = _store(tmp_path, [full])
    assert "| attnkit exact (full) | 1 | 1.10x (noisy!) |" in md
    assert "within timing noise" in md


def test_kv_tables_flag_where_the_full_cache_fails(tmp_path):
    rows = []
    for depth, acc in ((0.25, 1.0), (0.75, 0.0)):
        rows.append(_row("niah", "full", acc, depth=depth, variant="single"))
        r = _row("niah", "full@512", 0.0, depth=depth, variant="single", kv_bytes=250.0, kv_full_bytes=1000.0)
        r.method, r.cache, r.budget, r.label = "full", "snapkv", "512", "snapkv@512"
        rows.append(r)
    md = _store(tmp_path, rows)
    assert "| full cache | all | 1 | 0 (full fails here) |" in md
