"""The bench-task recipe of docs/adding-a-method.md, as written: its file alone makes a task
that shows in `attnkit list --tasks`, runs in the benchmark and gets its own report section."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnkit.bench import build, report, runner
from attnkit.bench.tasks import TASKS, discover
from attnkit.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"
HEADING = "## Recipe: a bench task"


def recipe_code() -> str:
    """The Python block of the recipe: text between its heading and the next ``## ``."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the recipe holds one Python block: the whole task file"
    return blocks[0]


@pytest.fixture()
def recipe_task(tmp_path, monkeypatch):
    """The recipe written as a module of a temporary package, found by task discovery."""
    package = tmp_path / "recipe_tasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "random_agreement.py").write_text(recipe_code(), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "random_agreement" not in TASKS
    assert discover("recipe_tasks", [str(package)]) == ["recipe_tasks.random_agreement"]
    yield TASKS["random_agreement"]
    TASKS.pop("random_agreement", None)
    for name in ("recipe_tasks.random_agreement", "recipe_tasks"):
        sys.modules.pop(name, None)


def test_recipe_task_is_listed(recipe_task):
    result = CliRunner().invoke(app, ["list", "--tasks", "--json"])
    assert result.exit_code == 0, result.output
    assert '"task": "random_agreement"' in result.output
    assert '"section": "Agreement on random tensors"' in result.output


def test_recipe_task_runs_and_has_its_report_section(recipe_task, tmp_path):
    cfg = build.build_config({"tasks": {"random_agreement": {"heads": 2, "head_dim": 16}},
                              "methods": "full,streaming(sink=2,window=16)", "lengths": [64, 128]})
    outcome = runner.run(cfg, tmp_path / "run", progress=False)
    assert outcome.failed == 0, runner.errors(tmp_path / "run")
    assert outcome.measured == 4
    md, page = report.write(tmp_path / "run")
    text = md.read_text()
    assert "## Agreement on random tensors" in text
    assert "| method | length | rel. error | method s | n |" in text
    assert "| full | 64 | 0 | " in text  # exact attention agrees with itself
    section = text.split("## Headline scores", 1)[1]
    assert "random_agreement: rel_error (lower is better)" in section
    assert "| best | full |" in section  # exact attention has the lowest error
    assert "random_agreement: rel. error vs length" in page.read_text()
