"""The public API and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import attnkit as ak
from attnkit.cli import app
from attnkit.reference import reference_attention

runner = CliRunner()


def test_methods_records_are_complete():
    infos = ak.methods()
    names = [i.name for i in infos]
    assert len(names) == len(set(names))
    for i in infos:
        assert i.paper and i.year > 1990 and i.family
        assert i.arxiv or i.paper.startswith("attnkit"), f"{i.name}: cite the paper's arXiv id"
        assert set(i.kinds) <= {"prefill", "cache"}
    assert ak.method_info("streaming").config == {"sink": 4, "window": 1024}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_full_matches_reference_bottom_right(causal, dtype):
    q = torch.randn(2, 6, 5, 16).to(dtype)
    k = torch.randn(2, 2, 9, 16).to(dtype)
    v = torch.randn(2, 2, 9, 16).to(dtype)
    out, stats = ak.attention(q, k, v, method="full", causal=causal, return_stats=True)
    assert out.dtype == dtype and out.shape == (2, 6, 5, 16)
    expected = reference_attention(q, k, v, causal=causal)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((out.double() - expected).norm() / expected.norm()).item() < tol
    assert stats.density == 1.0 and stats.backend == "exact" and stats.pattern is None


def test_get_returns_reusable_configured_method():
    m = ak.get("streaming", sink=2, window=8)
    assert "streaming" in repr(m) and m.config.window == 8
    q = torch.randn(1, 2, 40, 8)
    assert torch.equal(m(q, q, q, causal=True), m(q, q, q, causal=True))


def test_custom_scale_is_used():
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    out = ak.attention(q, k, v, method="sliding_window", window=7, causal=True, scale=0.3, backend="gather")
    i = torch.arange(30)
    mask = (i[:, None] - i[None, :] < 7)
    assert (out.double() - reference_attention(q, k, v, mask=mask, causal=True, scale=0.3)).abs().max() < 1e-5


def test_cli_list_formats():
    table = runner.invoke(app, ["list"])
    assert table.exit_code == 0 and "streaming" in table.output
    js = runner.invoke(app, ["list", "--json"])
    records = json.loads(js.output)
    assert {"full", "streaming", "sliding_window"} <= {r["name"] for r in records}
    md = runner.invoke(app, ["list", "--markdown"])
    assert md.output.startswith("| method | family |") and "`streaming`" in md.output


def test_cli_info_and_unknown():
    ok = runner.invoke(app, ["info", "streaming", "--json"])
    assert json.loads(ok.output)["arxiv"] == "2309.17453"
    bad = runner.invoke(app, ["info", "streamin"])
    assert bad.exit_code == 2 and "Did you mean 'streaming'" in bad.output


def test_cli_speed_small_run(tmp_path):
    out = tmp_path / "speed.json"
    res = runner.invoke(app, ["speed", "--lengths", "256", "--repeats", "1", "--no-flex", "--heads", "2", "--dim", "16",
                              "--methods", "full,streaming(sink=4,window=64)", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["full", "streaming(sink=4,window=64)"]
    assert rows[1]["speedup_vs_sdpa"] > 0 and 0 < rows[1]["density"] < 1
    assert '{"speed": [' in res.output  # one JSON line for scripts


def test_readme_examples_run():
    """Every Python block of the README, executed as written."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md block {i}", "exec"), {})


def test_readme_method_table_is_current():
    import pathlib

    from attnkit.cli import methods_markdown

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("<!-- methods:start -->")[1].split("<!-- methods:end -->")[0].strip()
    assert table == methods_markdown(), "regenerate the README table with `attnkit list --markdown`"


def test_kernels_doc_examples_run():
    """Every Python block of docs/kernels.md, executed as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "kernels.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/kernels.md block {i}", "exec"), {})


def test_speed_backward_mode(tmp_path):
    """`attnkit speed --backward` times the backward against exact attention's backward."""
    out = tmp_path / "bwd.json"
    res = runner.invoke(app, ["speed", "--backward", "--lengths", "300", "--repeats", "1",
                                   "--methods", "streaming(sink=4,window=64)", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["full", "streaming(sink=4,window=64)"]
    assert all(r["extra"]["pass"] == "backward" and r["seconds"] > 0 for r in rows)
    assert rows[0]["backend"] == "exact" and rows[1]["backend"] == "dense"  # short: one masked call
