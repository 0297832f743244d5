"""The ``bench`` and ``report`` commands; ``add_commands(app)`` adds them to a typer app."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer

BENCH_HELP = """Run the benchmark (tasks x methods x lengths on a real model); resumable.

Results go to OUT/results.sqlite (one row per measurement, committed at once) and a
report to OUT/report.md + OUT/report.html. Running the same command again resumes.

Examples:

  attnkit bench --quick --out runs/quick

  attnkit bench --model smollm2-135m --tasks niah,fidelity --methods "full,streaming(sink=4,window=256)" --lengths 1k,2k --samples 5 --out runs/NAME

  attnkit bench --config configs/sweep.yaml --out runs/sweep

  attnkit bench --tasks niah,kv_decode --cache "snapkv,streaming(sink=4),tova" --budgets 256,25% --lengths 2k --depths 0.5,0.9 --out runs/kv

Check a command first: --dry-run validates everything (config, methods, caches, budgets,
task settings) and prints the plan (cases x methods x cache settings per task, what is
already stored in --out, the first case) without loading the model; --max-cases N measures
only the first N cases of each task (those a full run measures first):

  attnkit bench --tasks niah --cache snapkv,tova --budgets 25% --lengths 4k --out runs/kv --dry-run

  attnkit bench --tasks niah --cache snapkv,tova --budgets 25% --lengths 4k --out runs/kv --max-cases 1

With --cache, tasks that decode (niah, passkey, variable_tracking, kv_decode, ...) run every
case with the normal cache (the full baseline) and with every (policy x budget); a
budget is tokens kept per KV head and layer (512) or a share of the prompt kept (25%).
"""

REPORT_HELP = """Write report.md and a self-contained report.html (plots inlined) for a run directory.

Example: attnkit report runs/NAME
"""


def _bench_config(config: Optional[Path], quick: bool, threads: Optional[int], **overrides: Any) -> Any:
    """The validated BenchConfig of ``attnkit bench``'s options (file or preset + overrides)."""
    from . import build, parse

    if config is not None:
        data = parse.load_file(config)
    elif quick:
        data = build.PRESETS["quick"]
    else:
        data = {"tasks": ["niah"]}
    data = build.merge_cli(data, **overrides)
    if threads is not None:
        data["threads"] = threads
    return build.build_config(data)


def _report_plan(run_dir: Path, figures: Optional[Path]) -> None:
    """``attnkit report --dry-run``: the results it would read and the files it would write."""
    from .store import DB_NAME, stored_keys

    if not (run_dir / DB_NAME).is_file():
        typer.echo(f"error: run directory {run_dir} has no {DB_NAME}: run `attnkit bench ... --out {run_dir}` first",
                   err=True)
        raise typer.Exit(2)
    typer.echo(f"attnkit report --dry-run: {len(stored_keys(run_dir))} results in {run_dir / DB_NAME}")
    typer.echo(f"would write: {run_dir / 'report.md'}, {run_dir / 'report.html'}"
               + (f", SVG plots into {figures}" if figures is not None else ""))


def add_commands(app: typer.Typer) -> None:
    """Add ``bench`` and ``report`` to ``app`` (attnkit's CLI)."""

    @app.command("bench", help=BENCH_HELP)
    def bench(
        model: Optional[str] = typer.Option(None, "--model", help="model name (smollm2-135m) or local checkpoint path"),
        tasks: Optional[str] = typer.Option(None, "--tasks", help="comma list of tasks (attnkit list --tasks), "
                                                                  "e.g. niah,fidelity; default niah"),
        methods: Optional[str] = typer.Option(None, "--methods", help='comma list, e.g. "full,streaming(sink=4,window=256)"'),
        cache: str | None = typer.Option(None, "--cache", help='KV-cache policies, comma list, e.g. '
                                            '"snapkv(window=64,kernel=5,pooling=\"avg\"),tova" (full is always measured)'),
        budgets: str | None = typer.Option(None, "--budgets", help="KV budgets for --cache: tokens kept per KV head "
                                              "and layer and/or % of the prompt kept, e.g. 128,512,25%,10%"),
        haystack: str | None = typer.Option(None, "--haystack", help="text of the tasks that read one: licenses, "
                                               "noise, gpl3 (the GPL-3 from its start: the KV needle anchor)"),
        lengths: Optional[str] = typer.Option(None, "--lengths", help="comma list of tokens, e.g. 1k,2k,4096"),
        depths: Optional[str] = typer.Option(None, "--depths", help="needle depths, e.g. 0,0.25,0.5 or 0%,50%,100%"),
        samples: Optional[int] = typer.Option(None, "--samples", help="samples per (length, depth)"),
        seed: Optional[int] = typer.Option(None, "--seed", help="generator seed (default 0)"),
        config: Optional[Path] = typer.Option(None, "--config", help="YAML/TOML sweep file (see docs/benchmark.md)"),
        quick: bool = typer.Option(False, "--quick", help="the quick preset of `make bench` (< 10 min on 2 CPU cores)"),
        out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/quick or runs/bench)"),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's)"),
        report: bool = typer.Option(True, "--report/--no-report", help="write the report at the end"),
        json_line: bool = typer.Option(False, "--json", help="print one JSON line with the counts at the end"),
        dry_run: bool = typer.Option(False, "--dry-run", help="validate and print the plan (counts per task, "
                                                              "results already in --out, the first case); load "
                                                              "and measure nothing"),
        max_cases: Optional[int] = typer.Option(None, "--max-cases", min=1, help="measure only the first N cases "
                                                "of each task (a quick check of a long command)"),
    ) -> None:
        from rich.console import Console

        from . import dryrun, runner
        from . import report as reportmod

        console = Console(stderr=True)
        if quick and config is not None:
            raise typer.BadParameter("use either --quick or --config, not both", param_hint="--quick")
        try:
            cfg = _bench_config(config, quick, threads, model=model, tasks=tasks, methods=methods, lengths=lengths,
                                depths=depths, samples=samples, seed=seed, caches=cache, budgets=budgets,
                                haystack=haystack)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        run_dir = out or Path("runs/quick" if quick else "runs/bench")
        if dry_run:
            typer.echo(dryrun.describe(cfg, run_dir, max_cases=max_cases))
            return
        command = " ".join(shlex.quote(a) for a in ["attnkit", *sys.argv[1:]])
        outcome = runner.run(cfg, run_dir, command=command, console=console, max_cases=max_cases)
        compared = f", {outcome.not_compared} not compared (full fails them)" if outcome.not_compared else ""
        console.print(f"{outcome.measured} measured, {outcome.skipped} already stored, {outcome.failed} failed"
                      f"{compared} in {outcome.seconds:.0f} s", highlight=False)
        if outcome.skipped:
            console.print(f"{outcome.skipped} results were read from {run_dir}/results.sqlite, not measured again: "
                          f"for fresh numbers delete {run_dir} or give another --out", highlight=False)
        if report:
            md, page = reportmod.write(run_dir)
            console.print(f"report: {md} and {page}", highlight=False)
        if json_line:
            print(runner.to_json(outcome))
        if outcome.failed:
            raise typer.Exit(1)

    @app.command("report", help=REPORT_HELP)
    def report_cmd(
        run_dir: Path = typer.Argument(..., help="a run directory written by `attnkit bench --out`"),
        json_line: bool = typer.Option(False, "--json", help="also print one JSON line of headline numbers"),
        figures: Optional[Path] = typer.Option(None, "--figures", help="also write every plot as SVG into this "
                                                                       "folder (needs kaleido + Chromium)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="check the run directory and print what would be "
                                                              "written; write nothing"),
    ) -> None:
        from . import report as reportmod

        if dry_run:
            _report_plan(run_dir, figures)
            return
        try:
            md, page = reportmod.write(run_dir, figures=figures)
        except (FileNotFoundError, ImportError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"wrote {md} and {page}")
        if json_line:
            typer.echo(reportmod.summary_json(run_dir))
