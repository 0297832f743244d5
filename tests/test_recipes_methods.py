"""The method recipes of ``docs/adding-a-method.md`` work as written.

Each recipe section's first code block is a method file. The test writes it, unchanged,
as a new module of a temporary package (no file of the repository is touched), imports
it, and checks that the method is registered, shows in ``attnkit list``, and passes the
generic checks (``method_checks``): forward and gradients on every backend equal the
float64 oracle over the pattern it selected. A static recipe's second block is its
independent rule for ``tests/rules.py``; the pattern must equal it.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import rules
import torch
from method_checks import check_against_oracle
from prefill_cases import make_inputs
from typer.testing import CliRunner

import attnkit as ak
from attnkit import registry
from attnkit.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"
SHAPES = [(1, 4, 2, 1100, 1100), (1, 4, 2, 801, 1409)]  # Nq * Nk > DENSE_MAX_ELEMS: sparse kernels run


def section(title: str) -> str:
    """The text of ``## title`` up to the next ``## `` heading."""
    text = DOC.read_text()
    head = f"## {title}\n"
    assert text.count(head) == 1, f"{DOC.name} needs exactly one section {head.strip()!r}"
    return re.split(r"^## ", text.split(head, 1)[1], flags=re.MULTILINE)[0]


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


@pytest.fixture
def add_module(tmp_path, monkeypatch):
    """Writes a recipe file into a fresh temporary package and imports it; the registry,
    sys.path and sys.modules are restored afterwards."""
    saved = [dict(table) for table in (registry._REGISTRY, registry._INFO, registry._POLICIES)]
    monkeypatch.syspath_prepend(str(tmp_path))
    package = tmp_path / "recipes"
    package.mkdir()
    (package / "__init__.py").write_text("")

    def add(source: str):
        first = source.splitlines()[0]
        assert first.startswith("# ") and first.endswith(".py"), f"a recipe file starts with its path: {first!r}"
        name = Path(first[2:]).stem
        (package / f"{name}.py").write_text(source)
        return importlib.import_module(f"recipes.{name}")

    yield add
    for table, old in zip((registry._REGISTRY, registry._INFO, registry._POLICIES), saved):
        table.clear()
        table.update(old)
    for name in [m for m in sys.modules if m == "recipes" or m.startswith("recipes.")]:
        del sys.modules[name]


def registered_name(module) -> str:
    names = [obj.name for obj in vars(module).values() if isinstance(obj, type) and obj.__module__ == module.__name__ and hasattr(obj, "info")]
    assert len(names) == 1, f"the recipe should register one method, got {names}"
    return names[0]


def check_listed(name: str, family: str) -> None:
    assert name in {info.name for info in ak.methods(family=family)}
    listed = CliRunner().invoke(app, ["list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert name in listed.output


def run_checks(name: str, config: dict, causal: bool, shape) -> torch.Tensor:
    b, hq, hkv, nq, nk = shape
    q, k, v = make_inputs(b, hq, hkv, nq, nk, seed=nq + causal, requires_grad=True)
    grad_out = torch.randn(b, hq, nq, q.shape[-1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return check_against_oracle(name, config, causal, q, k, v, grad_out, max_density=1.01)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_static_pattern_recipe(add_module, causal):
    method_file, rule_block = code_blocks(section("Recipe: a static pattern"))[:2]
    name = registered_name(add_module(method_file))
    check_listed(name, "static_sparse")
    namespace = {**vars(rules), "RULES": dict(rules.RULES)}
    exec(rule_block, namespace)  # noqa: S102  (the recipe's independent rule, beside the others of tests/rules.py)
    cases = namespace["RULES"][name]
    assert cases, "the recipe's rule block adds cases to RULES"
    for (config, rule), shape in zip(cases, SHAPES):
        nq, nk = shape[3:]
        mask = run_checks(name, config, causal, shape)
        assert torch.equal(mask, rule(config, nq, nk, causal).expand_as(mask)), f"{name} {config}: pattern != rule"


@pytest.mark.parametrize(("causal", "shape"), list(zip([True, False], SHAPES)), ids=["causal-gqa-N1100", "noncausal-Nq801-Nk1409"])
def test_dynamic_estimator_recipe(add_module, causal, shape):
    (method_file,) = code_blocks(section("Recipe: a dynamic estimator"))[:1]
    name = registered_name(add_module(method_file))
    check_listed(name, "dynamic_sparse")
    mask = run_checks(name, {"block": 64, "top_n": 4}, causal, shape)
    density = mask.sum().item() / mask.numel()
    assert density < 0.5, f"{name}: density {density:.2f} is not sparse"
