"""Every command line of the README's and docs/*.md's ```bash blocks runs as written.

Each ``attnkit ...`` line is run with ``--dry-run`` appended (validated, nothing loaded or
measured) and its printed plan must name what the line asked for (tasks, methods, caches,
budgets, lengths, model, files). A dry run may fail only when a file it reads is written
by an earlier command of the same block, and only with the error that names that command
(``estimator file X does not exist: run `attnkit calibrate-sea --out X` first``). The
README's ``attnkit bench`` lines then run for real with ``--max-cases 1`` (their first
case), after its ``calibrate-sea`` line with the smallest settings.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnkit.bench.parse import parse_lengths
from attnkit.cli import _split_methods, app

ROOT = Path(__file__).parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIPPED_PROGRAMS = {"make", "source"}
# errors a dry run may end with: a file written by an earlier command of the same block
PRODUCED_BY = {
    "calibrate-sea": re.compile(r"estimator file '([^']+)' does not exist: run `attnkit calibrate-sea --out \1` first"),
    "bench": re.compile(r"run directory (\S+) has no results\.sqlite: run `attnkit bench \.\.\. --out \1` first"),
}
runner = CliRunner()


def block_commands(text: str) -> list[list[list[str]]]:
    """The command lines of each ```bash block of ``text`` as argv lists: backslash
    continuations joined, comments dropped, ``make`` / ``source`` lines skipped."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", body)
        argvs = [shlex.split(line, comments=True) for line in joined.splitlines()]
        blocks.append([a for a in argvs if a and a[0] not in SKIPPED_PROGRAMS])
    return blocks


def doc_commands() -> list[tuple[str, list[str], list[list[str]]]]:
    """(where, argv, the commands before it in its block) for every command of the docs."""
    out = []
    for path in DOC_FILES:
        for b, block in enumerate(block_commands(path.read_text(encoding="utf-8"))):
            for i, argv in enumerate(block):
                out.append((f"{path.relative_to(ROOT)}#{b}.{i}", argv, block[:i]))
    return out


def makefile_commands() -> list[tuple[str, list[str], list[list[str]]]]:
    """The ``attnkit`` lines of the Makefile (what ``make bench`` runs), as ``doc_commands``."""
    lines = re.findall(r"^\t\$\(BIN\)/(attnkit .*)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    argvs = [shlex.split(line, comments=True) for line in lines]
    return [(f"Makefile#{i}", argv, argvs[:i]) for i, argv in enumerate(argvs)]


COMMANDS = doc_commands()
ATTNKIT = [c for c in COMMANDS if c[1][0] == "attnkit"] + makefile_commands()


def option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` in ``argv`` (None when absent)."""
    return argv[argv.index(name) + 1] if name in argv else None


def invoke(args: list[str]) -> tuple[int, str]:
    """Run ``attnkit ARGS`` in-process; (exit code, stdout + stderr)."""
    res = runner.invoke(app, args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def line_of(output: str, prefix: str) -> str:
    """The first plan line starting with ``prefix`` (stripped); fails when there is none."""
    found = [ln.strip() for ln in output.splitlines() if ln.strip().startswith(prefix)]
    assert found, f"the plan has no {prefix!r} line:\n{output}"
    return found[0]


def check_bench_plan(argv: list[str], output: str) -> None:
    """The bench plan names the command's model, tasks, methods, caches, budgets, lengths, --out."""
    for name in (option(argv, "--tasks") or "").split(","):
        assert not name or f"task {name}:" in output, f"task {name} missing from the plan:\n{output}"
    if option(argv, "--model"):
        assert line_of(output, "model:") == f"model: {option(argv, '--model')}"
    if option(argv, "--out"):
        assert f"run directory: {option(argv, '--out')} " in output
    for flag, prefix in (("--methods", "methods:"), ("--cache", "caches:")):
        for spec in _split_methods(option(argv, flag) or ""):
            name = spec.split("(")[0]
            assert re.search(rf"[:,] {re.escape(name)}\b", line_of(output, prefix)), f"{spec} not in the plan"
    for budget in filter(None, (option(argv, "--budgets") or "").split(",")):
        assert budget in line_of(output, "budgets:").split(": ", 1)[1].split(", ")
    if option(argv, "--lengths"):
        planned = line_of(output, "lengths:").split(";")[0].split(": ")[1].split(", ")
        assert planned == [str(n) for n in parse_lengths(option(argv, "--lengths"))]
    assert "first case: task " in output


def check_plan(argv: list[str], output: str) -> None:
    """The dry run's output names what ``argv`` asked for."""
    command = argv[1]
    if command == "bench":
        check_bench_plan(argv, output)
    elif command == "calibrate-sea":
        assert f"would write: {option(argv, '--out')}" in output
        if option(argv, "--layers") not in (None, "all"):
            assert line_of(output, "layers:") == f"layers: {option(argv, '--layers')}"
    elif command == "speed":
        if option(argv, "--methods"):
            assert line_of(output, "methods:") == f"methods: {', '.join(_split_methods(option(argv, '--methods')))}"
        if option(argv, "--lengths"):
            lengths = ", ".join(map(str, parse_lengths(option(argv, "--lengths"))))
            assert line_of(output, "lengths:") == f"lengths: {lengths}"
    elif command == "hybrid-speed":
        if option(argv, "--lengths"):
            lengths = ", ".join(map(str, parse_lengths(option(argv, "--lengths"))))
            assert line_of(output, "lengths:") == f"lengths: {lengths}"
        if option(argv, "--models"):
            assert line_of(output, "models:") == f"models: {option(argv, '--models')}"
    elif command == "report":
        assert f"would write: {argv[2]}/report.md" in output
    elif command == "duo-gates":
        assert f"would write: {option(argv, '--out')}" in output
        if option(argv, "--model"):
            assert line_of(output, "model:").startswith(f"model: {option(argv, '--model')}")
    elif command == "analyze":
        assert f"would write: {option(argv, '--out')}/profile.json" in output
        if option(argv, "--model"):
            assert line_of(output, "model:").startswith(f"model: {option(argv, '--model')}")


def produced_earlier(output: str, earlier: list[list[str]]) -> bool:
    """Whether the dry run failed only because an earlier command of the block writes a file
    it reads, with the error naming that command."""
    for command, pattern in PRODUCED_BY.items():
        match = pattern.search(output)
        if match and any(a[:2] == ["attnkit", command] and option(a, "--out") == match.group(1) for a in earlier):
            return True
    return False


def test_docs_have_commands():
    """The extraction finds the README's and the docs' commands (a broken fence would hide them)."""
    readme = [c for c in ATTNKIT if c[0].startswith("README.md")]
    assert {c[1][1] for c in readme} >= {"bench", "calibrate-sea"}
    assert len(ATTNKIT) >= 25
    others = [c for c in COMMANDS if c[1][0] != "attnkit"]
    assert all(c[1][:2] == ["python", "-m"] for c in others), others


@pytest.mark.parametrize("where,argv,earlier", ATTNKIT, ids=[c[0] for c in ATTNKIT])
def test_doc_command_dry_run(where, argv, earlier, monkeypatch):
    """``attnkit ... --dry-run`` exits 0 and its plan names what the command asked for."""
    monkeypatch.chdir(ROOT)
    code, output = invoke(argv[1:] + ["--dry-run"])
    if code != 0 and produced_earlier(output, earlier):
        return
    assert code == 0, f"{where}: {shlex.join(argv)} --dry-run failed:\n{output}"
    check_plan(argv, output)


def test_bench_help_examples_dry_run(monkeypatch):
    """The examples of ``attnkit bench --help`` dry-run too."""
    from attnkit.bench.cli_commands import BENCH_HELP

    monkeypatch.chdir(ROOT)
    examples = [shlex.split(ln) for ln in BENCH_HELP.splitlines() if ln.strip().startswith("attnkit bench ")]
    assert len(examples) >= 5
    for argv in examples:
        code, output = invoke([*argv[1:], "--dry-run"])
        assert code == 0, f"{shlex.join(argv)} --dry-run:\n{output}"
        check_plan(argv, output)


def test_dry_run_still_rejects_bad_input():
    """--dry-run validates as a run does: a bad task, method or budget exits 2 and says why."""
    for args, needle in ((["--tasks", "nope"], "nope"), (["--methods", "streaming(windw=4)"], "windw"),
                         (["--cache", "snapkv"], "needs budgets")):
        code, output = invoke(["bench", *args, "--dry-run"])
        assert code == 2 and needle in output, output


@pytest.mark.parametrize("where,argv", [c[:2] for c in COMMANDS if c[1][:2] == ["python", "-m"]],
                         ids=[c[0] for c in COMMANDS if c[1][:2] == ["python", "-m"]])
def test_doc_python_module_flags(where, argv):
    """``python -m MODULE --flag ...`` lines: the module exists and takes every flag used."""
    res = subprocess.run([sys.executable, "-m", argv[2], "--help"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    for flag in (a.split("=")[0] for a in argv[3:] if a.startswith("--")):
        assert flag in res.stdout, f"{where}: {argv[2]} has no {flag}"


def readme_bench_block() -> list[list[str]]:
    """The README block with its ``attnkit bench`` lines (its calibrate-sea line too)."""
    blocks = block_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    return next(b for b in blocks if any(a[:2] == ["attnkit", "bench"] for a in b))


# what the real first-case runs shorten (the commands' own settings are minutes long)
SMALL_CALIBRATION = ["--tokens", "256", "--steps", "2", "--features", "8"]


def first_case_args(argv: list[str]) -> list[str]:
    """``attnkit bench`` ARGS for the first case only, shortened: 1k tokens, no report, only the
    first of the --budgets (every policy still runs; each decoding setting takes seconds)."""
    args = argv[1:] + ["--max-cases", "1", "--no-report", "--json", "--lengths", "1k"]
    if "--budgets" in args:
        i = args.index("--budgets") + 1
        args[i] = args[i].split(",")[0]
    return args


@pytest.mark.slow
def test_readme_bench_commands_first_case(tmp_path, monkeypatch, smollm2):
    """The README's bench block, in order, for real: calibrate-sea with its smallest
    settings, then each ``attnkit bench`` line's first case (``--max-cases 1``) at 1k tokens,
    with the first of its budgets."""
    from attnkit import models

    load = models.load
    monkeypatch.setattr(models, "load", lambda name, *a, **k: smollm2 if name == "smollm2-135m"
                        else load(name, *a, **k))
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    ran = 0
    for argv in readme_bench_block():
        if argv[1] not in ("bench", "calibrate-sea"):
            continue  # e.g. `attnkit analyze`: dry-run by test_doc_command_dry_run
        args = argv[1:] + SMALL_CALIBRATION if argv[1] == "calibrate-sea" else first_case_args(argv)
        code, output = invoke(args)
        assert code == 0, f"{shlex.join(argv)}:\n{output}"
        if argv[1] == "bench":
            ran += 1
            counts = json.loads(output.strip().splitlines()[-1])
            assert counts["failed"] == 0 and counts["measured"] == counts["total"] > 0, output
    assert ran >= 2
