"""The ``attnkit`` command line: list, info, speed, calibrate-sea (+ bench, report from attnkit.bench; analyze
from attnkit.analysis)."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import registry

app = typer.Typer(
    help="attnkit: efficient attention for long-context transformers.\n\nExample: attnkit list",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _config_text(config: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items()) or "-"


def _arxiv_link(arxiv: str) -> str:
    return f"[{arxiv}](https://arxiv.org/abs/{arxiv})" if arxiv else "-"


def methods_markdown() -> str:
    """The method table of the README, generated from the registry."""
    lines = [
        "| method | family | paper | arXiv | year | supports | config (defaults) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for info in registry.methods():
        lines.append(
            f"| `{info.name}` | {info.family} | {info.paper} | {_arxiv_link(info.arxiv)} "
            f"| {info.year} | {', '.join(info.supports)} | {_config_text(info.config)} |"
        )
    return "\n".join(lines)


@app.command("list")
def list_methods(
    as_json: bool = typer.Option(False, "--json", help="One JSON array of method records."),
    markdown: bool = typer.Option(False, "--markdown", help="A Markdown table (the README's)."),
    family: Optional[str] = typer.Option(None, help="Only this family, e.g. static_sparse."),
    tasks: bool = typer.Option(False, "--tasks", help="List the benchmark tasks instead (attnkit bench --tasks)."),
) -> None:
    """List the registered methods (or, with --tasks, the benchmark tasks).

    Example: attnkit list --markdown
    """
    if tasks:
        _list_tasks(as_json)
        return
    infos = registry.methods(family=family)
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    if markdown:
        typer.echo(methods_markdown())
        return
    table = Table(title="attnkit methods")
    for col in ("method", "family", "paper", "arXiv", "year", "supports"):
        table.add_column(col)
    for i in infos:
        table.add_row(i.name, i.family, i.paper, i.arxiv, str(i.year), ", ".join(i.supports))
    console.print(table)


def _list_tasks(as_json: bool) -> None:
    """The registered benchmark tasks: name, score, direction, whether they decode."""
    from .bench.tasks import TASKS

    records = [{"task": name, "score": cls.score_name, "higher_is_better": cls.higher_is_better,
                "uses_cache": cls.uses_cache, "needs_model": cls.needs_model,
                "section": cls.section.title or name} for name, cls in sorted(TASKS.items())]
    if as_json:
        typer.echo(json.dumps(records, indent=2))
        return
    table = Table(title="attnkit bench tasks")
    for col in ("task", "score", "better", "KV cache", "report section"):
        table.add_column(col)
    for r in records:
        table.add_row(r["task"], r["score"], "higher" if r["higher_is_better"] else "lower",
                      "yes" if r["uses_cache"] else "", r["section"])
    console.print(table)


@app.command("info")
def info(
    name: str = typer.Argument(..., help="A method name from `attnkit list`."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON record."),
) -> None:
    """Show one method: paper, arXiv id, what it supports, config fields with defaults.

    Example: attnkit info streaming
    """
    try:
        record = registry.method_info(name)
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(record.to_dict(), indent=2))
        return
    console.print(f"[bold]{record.name}[/bold] ({record.family}) — {record.summary}")
    console.print(f"paper: {record.paper} (arXiv:{record.arxiv}, {record.year})")
    console.print(f"supports: {', '.join(record.supports)}; kinds: {', '.join(record.kinds)}")
    console.print(f"config: {_config_text(record.config)}")
    inputs = registry.method_class(name).inputs
    if inputs:
        console.print(f"per-call inputs: {', '.join(inputs)} (docs/linear.md)")


def _parse_lengths(text: str) -> list[int]:
    out = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError:
            raise typer.BadParameter(f"length {part!r}: use integers or NUMk, e.g. 4k,16k") from None
    return out


def _split_methods(text: str) -> list[str]:
    """Split "a,b(x=1,y=2),c" at top-level commas."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [m.strip() for m in out if m.strip()]


DEFAULT_SPEED_METHODS = ("full,streaming(sink=64,window=1024),sliding_window(window=1024),"
                         "neighborhood(kernel_size=13,grid=2d)")


@app.command("speed")
def speed(
    methods: Optional[str] = typer.Option(
        None,
        help="Comma-separated method specs NAME(field=value,...); grid=2d picks a square grid. Default: "
             f"{DEFAULT_SPEED_METHODS} (or every method of --family).",
    ),
    family: Optional[str] = typer.Option(None, help="Every method of this family instead of --methods, e.g. linear."),
    lengths: str = typer.Option("4k,16k,32k,64k", help="Sequence lengths, e.g. 4k,16k."),
    heads: int = typer.Option(8, help="Query heads H."),
    kv_heads: Optional[int] = typer.Option(None, help="KV heads (default: H); delta-rule methods: the q/k heads "
                                                  "(v gets H value heads)."),
    dim: int = typer.Option(64, help="Head dim D."),
    repeats: int = typer.Option(5, help="Timed runs per point (median reported)."),
    flex: bool = typer.Option(True, "--flex/--no-flex", help="Also time FlexAttention on each pattern."),
    backward: bool = typer.Option(False, "--backward", help="Time the backward pass (after an untimed forward) against exact attention's backward."),
    peers: bool = typer.Option(True, "--peers/--no-peers", help="Also time transformers' fallbacks of gated_delta "
                               "and kda on the same inputs (forward only; rows 'NAME (transformers fallback)')."),
    out: Optional[str] = typer.Option(None, help="Write the rows as JSON to this file."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Validate the methods and lengths and print the grid; time nothing."),
) -> None:
    """Operator latency and peak memory vs length, with speedups over exact attention (SDPA's CPU kernel) and FlexAttention.

    Example: attnkit speed --lengths 4k,16k --methods "full,streaming(sink=64,window=1024)"
    Backward: attnkit speed --backward --lengths 16k --methods "streaming(sink=64,window=1024),moba"
    Check first: attnkit speed --lengths 16k --methods moba --dry-run
    Linear family (chunked forms; gated_delta and kda also against transformers' fallbacks):
    attnkit speed --family linear --lengths 4k,16k
    """
    from rich.progress import Progress

    from .bench.speed import peer_count, run_speed, rows_to_json

    if family is not None and methods is not None:
        raise typer.BadParameter("use either --family or --methods, not both", param_hint="--family")
    if family is not None:
        names = [i.name for i in registry.methods(family=family)]
        if not names:
            families = sorted({i.family for i in registry.methods()})
            raise typer.BadParameter(f"no methods in family {family!r}; families: {', '.join(families)}",
                                     param_hint="--family")
        specs = names
    else:
        specs = _split_methods(methods or DEFAULT_SPEED_METHODS)
    ns = _parse_lengths(lengths)
    if dry_run:
        _speed_plan(specs, ns, heads=heads, kv_heads=kv_heads or heads, dim=dim, repeats=repeats, flex=flex,
                    backward=backward, peers=peers, out=out)
        return
    with Progress(console=console, transient=True) as bar:
        per_length = len(specs) + ("full" not in specs) + peer_count(specs, backward, peers)
        task = bar.add_task("speed", total=len(ns) * per_length)

        def step(label: str) -> None:
            bar.update(task, advance=1, description=label)

        rows = run_speed(specs, ns, repeats=repeats, flex=flex, progress=step, backward=backward, peers=peers,
                         heads=heads, kv_heads=kv_heads or heads, dim=dim)
    console.print(speed_table(rows, backward))
    record = rows_to_json(rows)
    if out:
        with open(out, "w") as f:
            json.dump(record, f, indent=2)
    typer.echo(json.dumps({"speed": record}))


@app.command("hybrid-speed")
def hybrid_speed(
    models: str = typer.Option("qwen3_next,kimi_linear,minimax", help="Hybrid model families (random 2-layer models)."),
    lengths: str = typer.Option("8k", help="Prompt lengths, e.g. 4k,8k."),
    repeats: int = typer.Option(3, help="Timed prefills per side (median reported), after one warm-up."),
    out: Optional[str] = typer.Option(None, help="Write the rows as JSON to this file."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the models and lengths, print the plan; time nothing."),
) -> None:
    """Whole-model prefill of transformers' hybrid models: transformers' own fallbacks vs ak.patch.

    Random 2-layer models (a linear-attention layer, a softmax layer; hidden 512, MoE of 4
    experts), the two sides timed in turns on the same prompt, with the max difference of
    the last logits. Example: attnkit hybrid-speed --lengths 8k --repeats 3
    """
    from rich.progress import Progress

    from .bench.hybrid_speed import MODELS, rows_to_json, time_model

    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        raise typer.BadParameter(f"unknown model(s) {unknown}; allowed: {', '.join(MODELS)}", param_hint="--models")
    if repeats < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--repeats")
    ns = _parse_lengths(lengths)
    if dry_run:
        typer.echo("attnkit hybrid-speed --dry-run: nothing is built or timed")
        typer.echo(f"models: {', '.join(names)}")
        typer.echo(f"lengths: {', '.join(map(str, ns))}")
        typer.echo(f"repeats: {repeats} per side, after one warm-up" + (f"; would write: {out}" if out else ""))
        return
    rows = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("hybrid-speed", total=len(names) * len(ns) * 2 * (repeats + 1))
        for name in names:
            for n in ns:
                rows.append(time_model(name, n, repeats, lambda label: bar.update(task, advance=1, description=label)))
    table = Table(title="hybrid model prefill (median), fp32, use_cache=False")
    for col in ("model", "N", "transformers s", "ak.patch s", "speedup", "max logit diff"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.model, str(r.length), f"{r.transformers_s:.3f}", f"{r.attnkit_s:.3f}", f"{r.speedup:.2f}x",
                      f"{r.max_logit_diff:.1e}")
    console.print(table)
    record = rows_to_json(rows)
    if out:
        with open(out, "w") as f:
            json.dump(record, f, indent=2)
    typer.echo(json.dumps({"hybrid_speed": record}))


def _speed_plan(specs: list[str], ns: list[int], **settings: object) -> None:
    """``attnkit speed --dry-run``: build every (method, length) and print the grid, the
    generated inputs of linear methods and the transformers peers."""
    from . import api
    from .bench.linear_inputs import describe_inputs
    from .bench.speed import PEERS, parse_method_spec, peer_count

    built = {}
    for n in ns:
        for spec in specs:
            try:
                name, config = parse_method_spec(spec, n)
                built[spec] = api.get(name, **config)
            except (ValueError, TypeError) as exc:
                console.print(f"[red]error:[/red] method {spec!r} at length {n}: {exc}", highlight=False)
                raise typer.Exit(2) from None
    typer.echo("attnkit speed --dry-run: nothing is timed")
    typer.echo(f"methods: {', '.join(specs)}")
    typer.echo(f"lengths: {', '.join(map(str, ns))}")
    typer.echo(", ".join(f"{k}={v}" for k, v in settings.items()))
    for spec, method in built.items():
        if describe_inputs(method) != "-":
            typer.echo(f"inputs of {spec}: {describe_inputs(method)} (seeded)")
    peers = peer_count(specs, bool(settings.get("backward")), bool(settings.get("peers", True)))
    for spec, method in built.items():
        if peers and method.name in PEERS:
            module, func = PEERS[method.name]
            typer.echo(f"peer of {spec}: transformers fallback {func} ({module}), same inputs")
    typer.echo(f"{len(specs)} methods x {len(ns)} lengths = {len(specs) * len(ns)} timings"
               + ("" if "full" in specs else " (+ exact attention at each length)")
               + (f" (+ {peers} transformers fallback(s) at each length)" if peers else ""))


def speed_table(rows, backward: bool = False) -> Table:
    table = Table(title=f"operator {'backward ' if backward else ''}latency (median), causal, fp32")
    peers = any("speedup_vs_transformers" in r.extra for r in rows)
    cols = ["method", "N", "backend", "density", "seconds", "x SDPA", "flex s (compile)", "x flex", "peak MiB"]
    for col in cols + (["x transformers (max rel diff)"] if peers else []):
        table.add_column(col, justify="right")
    for r in rows:
        flex = f"{r.flex_seconds:.3f} ({r.flex_compile_seconds:.1f})" if r.flex_seconds else "-"
        cells = [
            r.method + ("" if r.extra.get("causal", True) else " (non-causal)"), str(r.length), r.backend,
            "-" if r.density != r.density else f"{r.density:.3f}", f"{r.seconds:.3f}",
            f"{r.speedup_vs_sdpa:.2f}" if r.speedup_vs_sdpa else "-", flex,
            f"{r.speedup_vs_flex:.2f}" if r.speedup_vs_flex else "-", f"{r.peak_mib:.0f}",
        ]
        if peers:
            x = r.extra.get("speedup_vs_transformers")
            cells.append(f"{x:.2f} ({r.extra['transformers_max_rel_diff']:.1e})" if x else "-")
        table.add_row(*cells)
    return table


@app.command("calibrate-sea")
def calibrate_sea(
    out: str = typer.Option(..., help="Estimator file to write (torch format), e.g. sea-smollm2.pt."),
    model: str = typer.Option("smollm2-135m", help="Model name or local checkpoint directory."),
    tokens: int = typer.Option(8192, help="Calibration tokens (Python's pydoc text, not the benchmark's)."),
    layers: str = typer.Option("all", help="Layer indices, e.g. 2,16, or all."),
    features: int = typer.Option(64, help="Trained features M per map (the map has 2M)."),
    steps: int = typer.Option(200, help="Adam steps per layer."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Validate and print what would be trained and written; load nothing."),
) -> None:
    """Train SEA's estimator on a model's own attention (distillation) for sea(estimator=OUT).

    Example: attnkit calibrate-sea --layers 2,16 --out runs/sea-smollm2.pt, then
    attnkit.apply(model, ("sea", {"estimator": "runs/sea-smollm2.pt"})) (each layer gets its
    own maps) or sea(estimator=runs/sea-smollm2.pt) in a benchmark config.
    Check first: attnkit calibrate-sea --layers 2,16 --out runs/sea-smollm2.pt --dry-run
    """
    for name, value in (("tokens", tokens), ("features", features), ("steps", steps)):
        if value < 1:
            raise typer.BadParameter(f"{name} must be a positive integer, got {value}", param_hint=f"--{name}")
    if dry_run:
        _calibrate_plan(out, model, tokens, layers, features, steps)
        return
    import time

    import torch
    from rich.progress import Progress

    from . import models
    from .bench import haystack
    from .bench.tasks.fidelity import capture_qkv
    from .methods.sparse_dynamic import sea

    if threads:
        torch.set_num_threads(threads)
    lm = models.load(model)
    chosen = _sea_layers(layers, lm.model.config.num_hidden_layers)
    ids = haystack.encode(lm.tokenizer, haystack.context(lm.tokenizer, tokens + 64, kind="pydoc"))[:tokens]
    start = time.perf_counter()
    with torch.no_grad():
        captured = capture_qkv(lm.model, torch.tensor([ids]), chosen)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("calibrating", total=len(chosen) * steps)

        def step(layer: int, i: int, loss: float) -> None:
            bar.update(task, advance=1, description=f"layer {layer} loss {loss:.3f}")

        est = sea.calibrate(captured, features=features, steps=steps, progress=step)
    sea.save_estimator(out, est, model=model, tokens=len(ids), text="pydoc", steps=steps, features=features)
    losses = {i: [round(float(x), 3) for x in e["loss"]] for i, e in est.items()}
    typer.echo(json.dumps({"estimator": out, "layers": chosen, "loss_first_last": losses,
                           "seconds": round(time.perf_counter() - start, 1)}))


def _sea_layers(layers: str, n_layers: int | None) -> list[int]:
    """calibrate-sea's --layers as indices ('all' needs ``n_layers``; None: not checked)."""
    if layers == "all":
        return list(range(n_layers or 0))
    try:
        chosen = [int(x) for x in layers.split(",") if x.strip()]
    except ValueError:
        chosen = []
    if not chosen or any(i < 0 or (n_layers is not None and i >= n_layers) for i in chosen):
        top = "N-1" if n_layers is None else n_layers - 1
        raise typer.BadParameter(f"layers must be 'all' or indices in 0..{top}, got {layers!r}", param_hint="--layers")
    return chosen


def _calibrate_plan(out: str, model: str, tokens: int, layers: str, features: int, steps: int) -> None:
    """``attnkit calibrate-sea --dry-run``: what would be trained and written (no model loaded)."""
    from pathlib import Path

    from . import models

    try:
        n_layers = models.facts(model).layers
    except ValueError:
        n_layers = None
    chosen = _sea_layers(layers, n_layers)
    typer.echo("attnkit calibrate-sea --dry-run: no model is loaded, nothing is trained")
    typer.echo(f"model: {model}")
    typer.echo(f"layers: {'all' if layers == 'all' and n_layers is None else ','.join(map(str, chosen))}")
    typer.echo(f"tokens: {tokens} (pydoc text); features: {features}; steps: {steps} per layer")
    exists = " (exists: it will be overwritten)" if Path(out).exists() else ""
    typer.echo(f"would write: {out}{exists}")


try:  # the benchmark's commands (bench, report) live with the benchmark
    from .bench.cli_commands import add_commands
except ImportError:  # pragma: no cover - during development
    add_commands = None
if add_commands is not None:
    add_commands(app)

from .analysis.cli_command import add_command as _add_analyze  # noqa: E402

_add_analyze(app)


if __name__ == "__main__":
    app()
