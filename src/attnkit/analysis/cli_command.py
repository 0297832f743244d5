"""The ``analyze`` command; ``add_command(app)`` adds it to a typer app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

ANALYZE_HELP = """Profile every attention head of a model on real text: sinks, hidden sinks, entropy,
streaming-ness, MInference pattern class and (with a needle) retrieval score.

Writes OUT/profile.json (attnkit.analysis.HeadProfile.from_json reads it), one layer x head
heatmap per score as OUT/heatmap-SCORE.png, coarse attention maps of a few chosen heads
as OUT/map-LAYER-HEAD.png, and OUT/analyze.html (docs/analysis.md).

Example: attnkit analyze --model smollm2-135m --length 1k --out runs/analyze

Check first: attnkit analyze --model smollm2-135m --length 1k --out runs/analyze --dry-run
"""


def _settings(length: str, depths: str) -> tuple[int, list[float]]:
    from ..bench.parse import parse_depths, parse_length

    try:
        n = parse_length(length)
        ds = parse_depths(depths)
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from None
    if n < 2:
        raise typer.BadParameter(f"length must be at least 2 tokens, got {n}", param_hint="--length")
    return n, ds


DUO_HELP = """Find retrieval and streaming heads by DuoAttention's optimisation (arXiv 2410.10819):
train one gate per KV head (full vs sinks + recent attention) on synthetic passkey prompts,
the model frozen; the top --retrieval-share of all KV heads by gate are retrieval heads.

Writes OUT, the duo cache policy's plan {layer: [1 = retrieval, 0 = streaming per KV head]}
(attnkit.KVCache("duo", plan=OUT, budget=...)), and OUT's name with .gates.json: the
gates, the loss per step and the settings (docs/analysis.md, "DuoAttention's optimisation").

Example: attnkit duo-gates --model smollm2-135m --steps 30 --length 1k --out runs/duo-gates.json

Check first: attnkit duo-gates --model smollm2-135m --steps 30 --length 1k --out runs/duo-gates.json --dry-run
"""


def add_command(app: typer.Typer) -> None:
    """Add ``analyze`` and ``duo-gates`` to ``app`` (attnkit's CLI)."""
    _add_duo_command(app)

    @app.command("analyze", help=ANALYZE_HELP)
    def analyze(
        model: str = typer.Option("smollm2-135m", "--model", help="model name or local checkpoint directory"),
        length: str = typer.Option("1k", "--length", help="tokens of text to profile, e.g. 1k or 2048"),
        out: Path = typer.Option(Path("runs/analyze"), "--out", help="folder for profile.json, PNGs and analyze.html"),
        haystack: str = typer.Option("licenses", "--haystack", help="text: licenses, noise, gpl3, pydoc"),
        sample_rows: int = typer.Option(256, "--sample-rows", min=1, help="query rows scored per layer"),
        sink_tokens: int = typer.Option(4, "--sink-tokens", min=0, help="initial tokens counted as the sink"),
        window: int = typer.Option(64, "--window", min=1, help="local window of the streaming score"),
        alpha: float = typer.Option(5.0, "--alpha", help="ACT's hidden-sink threshold (x uniform attention)"),
        budget: float = typer.Option(0.1, "--budget", help="keys per row of the pattern comparison (share of N)"),
        retrieval: bool = typer.Option(True, "--retrieval/--no-retrieval",
                                       help="also measure retrieval scores (greedy needle answers)"),
        depths: str = typer.Option("0.1,0.5,0.9", "--depths", help="needle depths of the retrieval score"),
        new_tokens: int = typer.Option(24, "--new-tokens", min=1, help="tokens generated per needle prompt"),
        map_bins: int = typer.Option(64, "--map-bins", min=0, help="bins of the attention maps of chosen heads "
                                                                     "(0: no maps)"),
        threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="validate and print what would be measured and "
                                                              "written; load nothing"),
    ) -> None:
        from ..bench import haystack as hay

        n, ds = _settings(length, depths)
        if haystack not in hay.KINDS:
            raise typer.BadParameter(f"unknown {haystack!r}; allowed: {', '.join(hay.KINDS)}", param_hint="--haystack")
        if not 0 < budget <= 1:
            raise typer.BadParameter(f"budget must be in (0, 1], got {budget}", param_hint="--budget")
        files = [out / "profile.json", out / "analyze.html", out / "heatmap-SCORE.png"]
        files += [out / "map-LAYER-HEAD.png"] if map_bins else []
        if dry_run:
            _plan(model, n, ds if retrieval else [], haystack, sample_rows, files)
            return
        _run(model, n, out, haystack, sample_rows, sink_tokens, window, alpha, budget, ds if retrieval else [],
             new_tokens, threads, map_bins)


def _layers_in_words(model: str) -> str:
    """'30 layers' for a known model name; a local checkpoint's are read only when it loads."""
    from .. import models

    try:
        return f"{models.facts(model).layers} layers"
    except ValueError:
        return "layers: read from the checkpoint"


def _plan(model: str, n: int, depths: list[float], haystack: str, sample_rows: int, files: list[Path]) -> None:
    typer.echo("attnkit analyze --dry-run: no model is loaded, nothing is measured")
    typer.echo(f"model: {model} ({_layers_in_words(model)})")
    typer.echo(f"length: {n} tokens of {haystack} text; {min(sample_rows, n)} query rows scored per layer")
    typer.echo("retrieval: " + (f"needle prompts of {n} tokens at depths {', '.join(f'{d:g}' for d in depths)}"
                                if depths else "off"))
    typer.echo(f"would write: {', '.join(str(f) for f in files)}")


def _run(model: str, n: int, out: Path, haystack: str, sample_rows: int, sink_tokens: int, window: int,
         alpha: float, budget: float, depths: list[float], new_tokens: int, threads: int, map_bins: int) -> None:
    import time

    import torch
    from rich.console import Console
    from rich.progress import Progress

    from .. import models
    from ..bench import haystack as hay
    from . import profile as profile_fn
    from .figures import chosen_heads, heat_kinds, write_map_png, write_page, write_png
    from .retrieval import retrieval_scores

    console = Console(stderr=True)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    lm = models.load(model)
    layers = lm.model.config.num_hidden_layers
    ids = hay.encode(lm.tokenizer, hay.context(lm.tokenizer, n + 64, kind=haystack))[:n]
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("profiling layers", total=layers + len(depths))
        prof = profile_fn(lm.model, torch.tensor([ids]), sample_rows=sample_rows, sink_tokens=sink_tokens,
                          window=window, alpha=alpha, budget=budget, map_bins=min(map_bins, n),
                          progress=lambda i: bar.update(task, advance=1, description=f"layer {i}"))
        records: list[dict] = []
        if depths:
            bar.update(task, description="needle answers")
            scores, records = retrieval_scores(
                lm.model, lm.tokenizer, lengths=[n], depths=depths, new_tokens=new_tokens, haystack=haystack,
                template=lm.chat_prompt,
                progress=lambda length, d: bar.update(task, advance=1, description=f"needle depth {d:g}"))
            prof.retrieval = scores
    prof.meta.update({"model": model, "haystack": haystack, "retrieval_prompts": records})
    out.mkdir(parents=True, exist_ok=True)
    prof.to_json(out / "profile.json")
    pngs = {kind: f"heatmap-{kind}.png ({write_png(prof, kind, out / f'heatmap-{kind}.png')})"
            for kind in heat_kinds(prof)}
    maps = []
    if prof.maps is not None:
        for why, l, h in chosen_heads(prof):
            name = f"map-L{l}-H{h}.png"
            maps.append((why, l, h, f"{name} ({write_map_png(prof, l, h, why, out / name)})"))
    raster = any(v.endswith("(raster)") for v in [*pngs.values(), *(m[3] for m in maps)])
    note = ("The PNG files are plain rasters (kaleido found no Chrome): one cell per head, layers top to bottom, "
            "viridis from the score's min to max; the plots below are the labelled versions." if raster else "")
    write_page(prof, out / "analyze.html", pngs, note, maps)
    summary = {"out": str(out), "layers": prof.layers, "heads": prof.heads, "tokens": n,
               "top_sink": prof.top("sink", 3), "top_streaming": prof.top("streaming", 3),
               "patterns": {name: int((prof.pattern == i).sum()) for i, name in enumerate(("a_shape", "vertical_slash",
                                                                                          "block_sparse"))},
               "seconds": round(time.perf_counter() - start, 1)}
    if depths:
        summary["top_retrieval"] = prof.top("retrieval", 3)
        summary["needle_found"] = sum(r["found"] for r in records)
    console.print(f"wrote {out / 'profile.json'}, {out / 'analyze.html'} and {len(pngs)} PNG heatmaps"
                  + f", {len(maps)} attention maps" + (" (plain rasters: no Chrome for kaleido)" if raster else ""),
                  highlight=False)
    typer.echo(json.dumps({"analyze": summary}))


def _gates_path(out: Path) -> Path:
    return out.with_name(out.stem + ".gates.json")


def _add_duo_command(app: typer.Typer) -> None:
    @app.command("duo-gates", help=DUO_HELP)
    def duo_gates(
        model: str = typer.Option("smollm2-135m", "--model", help="model name or local checkpoint directory"),
        out: Path = typer.Option(Path("runs/duo-gates.json"), "--out", help="the duo plan JSON to write"),
        steps: int = typer.Option(30, "--steps", help="optimisation steps (one new passkey prompt each)"),
        length: str = typer.Option("1k", "--length", help="tokens per prompt, e.g. 1k or 2048"),
        passkeys: int = typer.Option(4, "--passkeys", help="passkeys per prompt"),
        words: int = typer.Option(8, "--words", help="words per passkey"),
        haystack: str = typer.Option("licenses", "--haystack", help="text: licenses, noise, gpl3, pydoc"),
        sink: int = typer.Option(16, "--sink", help="sink tokens of the streaming part"),
        recent: int = typer.Option(128, "--recent", help="recent tokens of the streaming part"),
        lr: float = typer.Option(0.02, "--lr", help="AdamW learning rate of the gates"),
        reg: float = typer.Option(0.05, "--reg", help="weight of the L1 term (mean |gate|)"),
        retrieval_share: float = typer.Option(0.25, "--retrieval-share",
                                              help="share of all KV heads kept as retrieval heads"),
        threshold: Optional[float] = typer.Option(None, "--threshold", help="instead of --retrieval-share: "
                                                  "retrieval heads are those with gate >= THRESHOLD"),
        seed: int = typer.Option(0, "--seed", help="seed of the passkey prompts"),
        threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="validate and print what would be trained and "
                                                              "written; load nothing"),
    ) -> None:
        from ..bench import haystack as hay

        n, _ = _settings(length, "0.5")
        for name, value in (("steps", steps), ("passkeys", passkeys), ("words", words), ("sink", sink),
                            ("recent", recent)):
            if value < 1:
                raise typer.BadParameter(f"{name} must be a positive integer, got {value}", param_hint=f"--{name}")
        if haystack not in hay.KINDS:
            raise typer.BadParameter(f"unknown {haystack!r}; allowed: {', '.join(hay.KINDS)}", param_hint="--haystack")
        if not 0 <= retrieval_share <= 1:
            raise typer.BadParameter(f"must be in [0, 1], got {retrieval_share}", param_hint="--retrieval-share")
        if threshold is not None and not 0 <= threshold <= 1:
            raise typer.BadParameter(f"must be in [0, 1], got {threshold}", param_hint="--threshold")
        if lr <= 0 or reg < 0:
            raise typer.BadParameter(f"lr must be > 0 and reg >= 0, got {lr}, {reg}", param_hint="--lr/--reg")
        select = f"gate >= {threshold}" if threshold is not None else f"top {retrieval_share:g} of all KV heads"
        if dry_run:
            typer.echo("attnkit duo-gates --dry-run: no model is loaded, nothing is trained")
            typer.echo(f"model: {model} ({_layers_in_words(model)})")
            typer.echo(f"steps: {steps} passkey prompts of {n} tokens ({passkeys} passkeys x {words} words, "
                       f"{haystack} text)")
            typer.echo(f"gates: full vs streaming(sink={sink}, recent={recent}); lr {lr:g}, reg {reg:g}; "
                       f"retrieval heads: {select}")
            typer.echo(f"would write: {out}, {_gates_path(out)}")
            return
        _run_duo(model, out, steps, n, passkeys, words, haystack, sink, recent, lr, reg,
                 None if threshold is not None else retrieval_share, threshold, seed, threads)


def _run_duo(model: str, out: Path, steps: int, n: int, passkeys: int, words: int, haystack: str, sink: int,
             recent: int, lr: float, reg: float, share: Optional[float], threshold: Optional[float], seed: int,
             threads: int) -> None:
    import time

    import torch

    from .. import models
    from .duo_train import duo_plan, train_duo_gates

    if threads:
        torch.set_num_threads(threads)
    lm = models.load(model)
    start = time.perf_counter()
    history: list = []
    gates = train_duo_gates(lm.model, lm.tokenizer, steps=steps, length=n, passkeys=passkeys, words=words,
                            haystack=haystack, sink=sink, recent=recent, lr=lr, reg=reg, seed=seed, history=history)
    seconds = round(time.perf_counter() - start, 1)
    plan = duo_plan(gates, retrieval_share=share, threshold=threshold)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plan, indent=1))
    settings = {"model": model, "steps": steps, "length": n, "passkeys": passkeys, "words": words,
                "haystack": haystack, "sink": sink, "recent": recent, "lr": lr, "reg": reg,
                "retrieval_share": share, "threshold": threshold, "seed": seed}
    _gates_path(out).write_text(json.dumps({"schema": "attnkit.duo_gates", "version": 1, "gates": gates.tolist(),
                                            "plan": plan, "history": history, "settings": settings,
                                            "train_seconds": seconds}, indent=1))
    retrieval = [[layer, head] for layer, row in plan.items() for head, x in enumerate(row) if x]
    typer.echo(json.dumps({"duo_gates": {"out": str(out), "gates": str(_gates_path(out)), "seconds": seconds,
                                         "retrieval_heads": retrieval,
                                         "loss_first_last": [round(history[0]["loss"], 5),
                                                             round(history[-1]["loss"], 5)]}}))
