"""The KV-cache recipe of docs/adding-a-method.md works as written: the code of its
section, saved as a new module of a temporary package (no other file changed), registers
a policy that ``attnkit list`` shows and that the generic cache checks cover."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import test_kvcache as generic
import torch
from typer.testing import CliRunner

import attnkit as ak
from attnkit import registry
from attnkit.cli import app
from attnkit.kvcache import KVCache

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Recipe: a KV-cache policy"


def recipe_code() -> str:
    """The one Python block between the recipe's heading and the next ``## `` heading."""
    text = (ROOT / "docs" / "adding-a-method.md").read_text(encoding="utf-8")
    assert HEADING in text
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one python block in the recipe, found {len(blocks)}"
    return blocks[0]


@pytest.fixture
def recipe(tmp_path, monkeypatch) -> str:
    """Import the recipe as ``recipe_pkg.<file>``; yields the policy name it registers.
    Registrations go to copies of the registry tables, restored after the test."""
    registry.methods()  # built-ins registered before the tables are copied
    for table in ("_REGISTRY", "_INFO", "_POLICIES"):
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    code = recipe_code()
    target = Path(code.splitlines()[0].lstrip("#").strip())  # where the recipe says it goes
    assert target.suffix == ".py" and not (ROOT / target).exists(), f"{target}: the recipe adds a new file"
    package = tmp_path / "recipe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / target.name).write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(registry._POLICIES)
    importlib.import_module(f"recipe_pkg.{target.stem}")
    added = set(registry._POLICIES) - before
    assert len(added) == 1, added
    yield added.pop()
    for name in [m for m in sys.modules if m == "recipe_pkg" or m.startswith("recipe_pkg.")]:
        del sys.modules[name]


def test_recipe_policy_is_listed(recipe):
    records = json.loads(CliRunner().invoke(app, ["list", "--json"]).output)
    (record,) = [r for r in records if r["name"] == recipe]
    assert record["kinds"] == ["cache"] and record["family"] == "kv_cache" and record["arxiv"]
    assert recipe in {m.name for m in ak.methods(kind="cache")}
    policy = KVCache(recipe, budget=8).policy
    assert policy.mode == "evict" and policy.has_budget()
    with pytest.raises(ValueError, match="valid fields with defaults"):
        KVCache(recipe, budget=8, no_such_field=1)


def test_recipe_policy_passes_the_generic_checks(recipe):
    generic.test_budget_above_length_is_exact(recipe)
    generic.test_decode_output_is_attention_over_kept_set(recipe)


def test_recipe_policy_on_a_tiny_model(recipe, tiny_llama):
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kw = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        ref = tiny_llama.generate(**inputs, **kw)
        with ak.patch(tiny_llama):
            full = tiny_llama.generate(**inputs, **kw, past_key_values=KVCache(recipe, budget=10**6))
            small = KVCache(recipe, budget=8, window=4)
            tiny_llama.generate(**inputs, **kw, past_key_values=small)
    assert torch.equal(full, ref)  # budget >= length: the full cache
    assert small.stats()["compressions"] == len(small.layers)  # one compression per layer, after the prompt
    for layer in range(len(small.layers)):
        per_head = (small.kept_positions(layer) >= 0).sum(-1)
        assert int(per_head.max()) <= 8 + 4  # the prefill budget, plus the 4 decode tokens appended
