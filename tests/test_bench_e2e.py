"""End to end: the CLI commands on a fake task (fast), and a tiny real run on SmolLM2."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from attnkit.bench import build, report, runner
from attnkit.bench.cli_commands import add_commands
from attnkit.bench.tasks import TASKS, Task, register_task


@pytest.fixture()
def app():
    app = typer.Typer()

    @app.command()
    def version() -> None:  # a second command, so typer keeps subcommand names
        print("0")

    add_commands(app)
    return app


@pytest.fixture()
def echo_task():
    @register_task("echo")
    class Echo(Task):
        needs_model = False
        uses_depth = True

        @dataclass
        class Params:
            bias: float = 0.0

        def measure(self, ctx, case, method, spec):
            hit = 1.0 if method.name == "full" or (case.depth or 0) > 0.5 else 0.0
            return {"score": hit + spec.params.bias, "accuracy": hit}

    yield
    TASKS.pop("echo")


def test_cli_bench_and_report(app, echo_task, tmp_path):
    out = tmp_path / "run"
    args = ["bench", "--tasks", "echo", "--methods", "full,streaming(sink=4,window=256)", "--lengths", "1k,2k",
            "--depths", "0,100%", "--samples", "2", "--out", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert '"measured": 16' in result.output
    with sqlite3.connect(out / "results.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 16
        labels = {r[0] for r in conn.execute("SELECT DISTINCT label FROM results")}
    assert labels == {"full", "streaming(sink=4,window=256)"}
    assert (out / "report.html").exists()
    again = CliRunner().invoke(app, args)
    assert '"measured": 0' in again.output and '"skipped": 16' in again.output
    rep = CliRunner().invoke(app, ["report", str(out), "--json"])
    assert rep.exit_code == 0 and "report.html" in rep.output and "echo/full" in rep.output


def test_cli_config_file_and_errors(app, echo_task, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("methods: [full]\nlengths: [512]\ntasks:\n  echo: {depths: [0.5], bias: 0.5}\n")
    result = CliRunner().invoke(app, ["bench", "--config", str(sweep), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(app, ["bench", "--tasks", "echo", "--methods", "streaming(sinks=4)",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "sinks" in bad.output and "sink=4" in bad.output
    sweep.write_text("tasks:\n  echo: {bias: 1, colour: 2}\n")
    bad = CliRunner().invoke(app, ["bench", "--config", str(sweep)])
    assert bad.exit_code == 2 and "'colour'" in bad.output and "bias" in bad.output
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2


def test_live_display_on_a_terminal(echo_task, tmp_path):
    import io

    from rich.console import Console

    cfg = build.build_config({"tasks": ["echo"], "methods": "full,streaming", "lengths": [16], "depths": [0.5],
                               "samples": 2})
    buf = io.StringIO()
    outcome = runner.run(cfg, tmp_path, console=Console(file=buf, force_terminal=True, width=120))
    assert outcome.measured == 4
    text = buf.getvalue()
    assert "live summary" in text and "4/4" in text and "accuracy=" not in text  # echo's score_name is "score"


@pytest.mark.slow
def test_tiny_bench_on_smollm2(smollm2, tmp_path):
    cfg = build.build_config({
        "model": "smollm2-135m", "methods": "full,streaming(sink=4,window=64)", "samples": 1,
        "tasks": {"niah": {"lengths": [512], "depths": [0.5]},
                  "fidelity": {"lengths": [512], "layers": [1]},
                  "perplexity": {"lengths": [256]},
                  "model_speed": {"lengths": [256], "decode_tokens": 2}},
    })
    outcome = runner.run(cfg, tmp_path, progress=False, lm=smollm2)
    assert outcome.failed == 0, runner.errors(tmp_path)
    assert outcome.measured == 8
    from attnkit.bench.store import Store

    with Store(tmp_path) as store:
        rows = {(r.task, r.method): r for r in store.rows()}
    assert rows[("niah", "full")].score == 1.0  # the needle is found with exact attention
    assert rows[("niah", "full")].metrics["prompt_tokens"] == pytest.approx(512, abs=25)
    fid_full, fid_stream = rows[("fidelity", "full")].metrics, rows[("fidelity", "streaming")].metrics
    assert fid_full["rel_error"] < 1e-4 and fid_full["recall"] == pytest.approx(1.0)
    assert fid_stream["rel_error"] > 1e-3 and 0 < fid_stream["recall"] < 1 and fid_stream["density"] < 0.5
    assert rows[("perplexity", "full")].score < rows[("perplexity", "streaming")].score
    speed = rows[("model_speed", "full")].metrics
    assert speed["prefill_seconds"] > 0 and speed["decode_ms_per_token"] > 0
    # the full row also timed transformers' own attention on the same tokens, same run
    assert speed["transformers_prefill_seconds"] > 0 and speed["prefill_speedup_vs_transformers"] > 0
    assert speed["max_abs_logit_diff_vs_transformers"] < 1e-3
    assert "transformers_prefill_seconds" not in rows[("model_speed", "streaming")].metrics
    assert speed["kv_cache_bytes"] == 2 * 30 * 3 * 256 * 64 * 4  # K and V, 30 layers, 3 KV heads, fp32
    md, page = report.write(tmp_path)
    html = page.read_text()
    # heatmap, accuracy vs depth, error vs density (fidelity), speed, pareto
    assert html.count("Plotly.newPlot('fig") == 5 and '"type":"heatmap"' in html
    assert "Fidelity" in md.read_text() and "Perplexity" in md.read_text()
