"""Reports from a run directory: Markdown, self-contained HTML, escaping, and a headless
Chromium check that the page loads without console errors and the plots render."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from attnkit.bench import report
from attnkit.bench.report.page import plotly_js
from attnkit.bench.store import Row, Store

EVIL = "evil(tag=\"<script>alert(1)</script>\")"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _fill(run_dir: Path) -> None:
    """A small synthetic run: every section of the report has rows."""
    labels = [("full", "full", "{}"), ("streaming", "streaming(sink=4,window=256)", '{"sink": 4, "window": 256}'),
              ("evil", EVIL, '{"tag": "<script>"}')]
    with Store(run_dir) as store:
        store.start_run({"model": "m"}, command="attnkit bench --quick")
        for method, label, cfg in labels:
            base = dict(model="m", method=method, config=cfg, label=label)
            for length in (1024, 2048):
                for depth in (0.0, 0.5, 1.0):
                    acc = 1.0 if method == "full" or depth >= 0.5 else 0.0
                    store.add(Row(task="niah", variant="single", length=length, depth=depth, sample=0, score=acc,
                                  metrics={"score": acc, "answer": "</script><b>42</b>"}, **base))
                seconds = length / 1000 * (1.0 if method == "full" else 0.6)
                store.add(Row(task="model_speed", variant="default", length=length, depth=None, sample=0,
                              score=seconds, metrics={"prefill_seconds": seconds, "decode_ms_per_token": 20.0,
                                                      "kv_cache_bytes": 1e6 * length}, **base))
                store.add(Row(task="fidelity", variant="layer2", length=length, depth=None, sample=0, score=0.1,
                              metrics={"rel_error": 0.1, "recall": 0.9, "density": 0.3, "method_seconds": 0.01},
                              **base))
                store.add(Row(task="perplexity", variant="licenses", length=length, depth=None, sample=0, score=9.0,
                              metrics={"perplexity": 9.0, "perplexity_first_half": 10.0,
                                       "perplexity_second_half": 8.0}, **base))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    _fill(run_dir)
    md, page = report.write(run_dir)
    return run_dir, md.read_text(), page.read_text()


def test_markdown_tables(written):
    _, md, _ = written
    for heading in ("Retrieval accuracy", "Fidelity", "Perplexity", "Model speed", "Pareto frontier"):
        assert heading in md
    assert "| streaming(sink=4,window=256) | 0 | 1 | 1 |" in md
    assert "<script>" not in md  # labels and configs are escaped in Markdown too
    assert "| evil(tag=&quot;" not in md and "evil(tag=\"&lt;script&gt;alert(1)&lt;/script&gt;\")" in md
    assert re.search(r"\| full \| 1 \| 1 \| 1 \| 1 \| 6 \|", md)


def test_html_self_contained_and_escaped(written):
    _, _, page = written
    bundle = plotly_js()
    assert bundle in page  # plotly.js inlined once
    ours = page.replace(bundle, "")
    assert "<script src" not in ours and "cdn.plot.ly" not in ours and "http" not in ours
    assert ours.count("Plotly.newPlot(") == 6  # heatmap, accuracy vs depth, error vs density x 2 lengths, speed, pareto
    assert '"type":"heatmap"' in page
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_pareto_frontier(written):
    run_dir, _, _ = written
    with Store(run_dir) as store:
        points, x_name, y_name = report.pareto_points(store.rows())
    by = {p["label"]: p for p in points}
    assert x_name.startswith("prefill speedup") and y_name == "retrieval accuracy (cases full solves)"
    assert by["full"]["speedup"] == pytest.approx(1.0) and by["full"]["accuracy"] == 1.0
    assert by["streaming(sink=4,window=256)"]["speedup"] == pytest.approx(1 / 0.6)
    assert by["full"]["frontier"] and by["streaming(sink=4,window=256)"]["frontier"]


def test_report_needs_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="attnkit bench --out"):
        report.write(tmp_path)


def chromium_check(page: Path, shot: Path) -> tuple[str, list[str]]:
    """Load ``page`` in headless Chromium: (rendered DOM, console messages); writes a screenshot."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0",
             "--window-size=1200,2000"]
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([CHROMIUM, *flags, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                              "--dump-dom", url], capture_output=True, text=True, timeout=120)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([CHROMIUM, *flags, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
                       capture_output=True, text=True, timeout=120)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    return dom.stdout, console


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_renders_in_chromium(written, tmp_path):
    run_dir, _, page = written
    dom, console = chromium_check(run_dir / "report.html", tmp_path / "shot.png")
    assert console == [], console
    n_figures = page.count("Plotly.newPlot('fig")
    # plotly draws each figure into an <svg class="main-svg">: the plots rendered.
    assert dom.count('class="main-svg"') >= n_figures
    assert "heatmaplayer" in dom
    shot = tmp_path / "shot.png"
    assert shot.exists() and shot.stat().st_size > 30_000  # a blank page compresses to a few KB


def _fid(method: str, label: str, density: float, error: float, length: int = 4096) -> Row:
    return Row(model="m", task="fidelity", variant="layer2", method=method, config=json.dumps({"label": label}),
               label=label, length=length,
               depth=None, sample=0, score=error, metrics={"rel_error": error, "density": density, "recall": 0.5})


def test_equal_density_comparison_interpolates_the_streaming_curve_in_log_density():
    rows = [_fid("streaming", "streaming(window=64)", 0.05, 0.6), _fid("streaming", "streaming(window=256)", 0.2, 0.2),
            _fid("vertical_slash", "vertical_slash", 0.1, 0.3), _fid("hip", "hip", 0.1, 0.5),
            _fid("moba", "moba", 0.5, 0.01), _fid("full", "full", 1.0, 0.0)]
    points = report.fidelity_points(rows)
    # log-linear: density 0.1 is halfway between 0.05 and 0.2 in log space -> error 0.4
    assert report.baseline_error_at(points, 4096, 0.1) == pytest.approx(0.4)
    assert report.baseline_error_at(points, 4096, 0.5) is None  # outside the measured windows
    assert report.baseline_error_at(points, 8192, 0.1) is None  # no baseline at that length
    verdicts = {v["label"]: v for v in report.equal_density_comparison(points)}
    assert set(verdicts) == {"vertical_slash", "hip"}  # moba out of range; full and streaming are not judged
    assert verdicts["vertical_slash"]["better"] and not verdicts["hip"]["better"]
    assert verdicts["hip"]["baseline_error"] == pytest.approx(0.4)


def test_fidelity_section_has_error_vs_density_plot_and_verdicts(tmp_path):
    rows = [_fid("streaming", "streaming(window=64)", 0.05, 0.6), _fid("streaming", "streaming(window=256)", 0.2, 0.2),
            _fid("vertical_slash", "vertical_slash", 0.1, 0.3)]
    with Store(tmp_path) as store:
        store.start_run({"model": "m"}, command="attnkit bench")
        for r in rows:
            store.add(r)
    md, page = report.write(tmp_path)
    text = md.read_text()
    assert "Against the static baseline at equal density" in text
    assert "| vertical_slash | 4096 | 0.1 | 0.3 | 0.4 | yes |" in text
    assert "Relative output error vs density at 4096 tokens" in page.read_text()


def test_figure_slug_names_files_by_number_and_title():
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title="Relative output error vs density at 4096 tokens (lower-left is better)")
    assert report.figure_slug(fig, 3) == "03-relative-output-error-vs-density-at-4096-tokens-lower-left-i.svg"
    assert report.figure_slug(go.Figure(), 1) == "01-figure.svg"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_writes_svg_figures(written, tmp_path):
    run_dir, _, _ = written
    report.write(run_dir, figures=tmp_path / "figs")
    svgs = sorted((tmp_path / "figs").glob("*.svg"))
    assert len(svgs) == 6
    assert all(p.read_text().lstrip().startswith("<svg") for p in svgs)


def test_error_density_curves_keep_trained_estimators_apart():
    from attnkit.bench.report.fidelity import _line_name

    assert _line_name({"method": "sea", "label": "sea(topk=256)"}) == "sea"
    assert _line_name({"method": "sea", "label": 'sea(estimator="runs/e.pt",topk=256)'}) == "sea (trained)"


def test_failed_measurements_list_only_failures_not_measured_since(tmp_path):
    """A failure that a later run measured (the retry succeeded) leaves the report."""
    with Store(tmp_path) as store:
        store.start_run({"model": "m"})
        row = Row(model="m", task="model_speed", variant="default", method="sea", config="{}", label="sea",
                  length=8192, depth=None, sample=0, score=1.0, metrics={"prefill_seconds": 1.0})
        fixed_key = row.key
        for key, label in ((fixed_key, "sea"), ("never-measured", "hip")):
            store.conn.execute("INSERT INTO errors (key, run_id, task, label, error, traceback, created) "
                               "VALUES (?,?,?,?,?,?,?)", (key, store.run_id, "model_speed", label, f"boom {label}", "", 0.0))
        store.add(row)
        store.conn.commit()
    md = report.build(tmp_path).markdown()
    section = md.split("## Failed measurements")[1]
    assert "1 failed" in section and "boom hip" in section and "boom sea" not in section


def test_long_context_headline_is_derived_from_the_rows(tmp_path):
    """The report opens with the headline at the longest model_speed length: transformers
    (timed by the full row), attnkit exact, a method and a KV setting; the "what to use
    when" paragraph is read off those numbers."""
    with Store(tmp_path) as store:
        store.start_run({"model": "gemma"}, command="attnkit bench --quick")
        full = {"prefill_seconds": 40.0, "decode_ms_per_token": 100.0, "kv_cache_bytes": 2 ** 20,
                "transformers_prefill_seconds": 120.0, "transformers_decode_ms_per_token": 110.0,
                "transformers_kv_cache_bytes": 2 ** 20, "max_abs_logit_diff_vs_transformers": 2e-5}
        store.add(Row(model="gemma", task="model_speed", variant="default", method="full", config="{}", label="full",
                      length=16384, depth=None, sample=0, score=40.0, metrics=full))
        store.add(Row(model="gemma", task="model_speed", variant="default", method="vs", config="{}", label="vs",
                      length=16384, depth=None, sample=0, score=30.0,
                      metrics={"prefill_seconds": 30.0, "decode_ms_per_token": 100.0, "kv_cache_bytes": 2 ** 20}))
        for depth in (0.25, 0.75):
            for label, cache, budget, acc, held in (("full", "", "", 1.0, None), ("vs", "", "", 0.5, None),
                                                    ("full", "snapkv", "10%", 1.0, 2 ** 18)):
                metrics = {"score": acc} if held is None else {"score": acc, "kv_bytes": held, "kv_full_bytes": 2 ** 20}
                store.add(Row(model="gemma", task="niah", variant="single", method=label, config="{}", label=label,
                              length=16384, depth=depth, sample=0, score=acc, metrics=metrics, cache=cache,
                              budget=budget))
    text = report.write(tmp_path)[0].read_text()
    assert text.index("## Headline: gemma at 16k tokens") < text.index("## Run")
    assert "| transformers (its own attention) | 120 | 1.00x |" in text
    assert "| attnkit exact (full) | 40 | 3.00x | 2.00e-05 | 1 | 1.0 MiB | 100 |" in text
    assert "| KV cache snapkv@10% | - | - | - | 1 | 0.2 MiB (25%) |" in text
    assert "prefill 3.00x faster than transformers' own attention (last-token logits within 2.0e-05)" in text
    assert "No sparse prefill method kept exact attention's accuracy (1.00); the best was `vs` (0.50)" in text
    assert "The smallest KV cache that kept its accuracy: `KV cache snapkv@10%`, 25% of the full cache's bytes." in text


def test_compressed_layers_share_is_shown_beside_the_all_layer_share(tmp_path):
    """A policy that compresses only some layers (Gemma 3's global layers) shows those
    layers' share next to the all-layer share in the headline and the KV tables; a
    policy on every layer shows the one share."""
    with Store(tmp_path) as store:
        store.start_run({"model": "gemma"}, command="attnkit bench --quick")
        full = {"prefill_seconds": 40.0, "decode_ms_per_token": 100.0, "kv_cache_bytes": 1000,
                "transformers_prefill_seconds": 120.0, "transformers_decode_ms_per_token": 110.0}
        store.add(Row(model="gemma", task="model_speed", variant="default", method="full", config="{}", label="full",
                      length=16384, depth=None, sample=0, score=40.0, metrics=full))
        for depth in (0.25, 0.75):
            store.add(Row(model="gemma", task="niah", variant="single", method="full", config="{}", label="full",
                          length=16384, depth=depth, sample=0, score=1.0, metrics={"score": 1.0}))
            # 1000 bytes in all, 800 of them on the compressed layers; 110 of those kept + 200 window bytes
            metrics = {"score": 1.0, "kv_bytes": 310, "kv_full_bytes": 1000, "kv_policy_layers_bytes": 110,
                       "kv_policy_layers_full_bytes": 800}
            store.add(Row(model="gemma", task="niah", variant="single", method="full", config="{}", label="full",
                          length=16384, depth=depth, sample=0, score=1.0, metrics=metrics, cache="snapkv",
                          budget="10%"))
            every = {"score": 1.0, "kv_bytes": 250, "kv_full_bytes": 1000, "kv_policy_layers_bytes": 250,
                     "kv_policy_layers_full_bytes": 1000}
            store.add(Row(model="gemma", task="niah", variant="single", method="full", config="{}", label="full",
                          length=16384, depth=depth, sample=0, score=1.0, metrics=every, cache="tova", budget="25%"))
    text = report.write(tmp_path)[0].read_text()
    assert "(31%; compressed layers 13.8%)" in text  # headline: 310 / 1000, 110 / 800
    assert "1 (31% bytes; compressed layers 13.8%)" in text  # accuracy-by-budget table
    assert "31.0%; compressed layers 13.8%" in text  # depth table
    assert "1 (25% bytes)" in text and "25% bytes; compressed" not in text
