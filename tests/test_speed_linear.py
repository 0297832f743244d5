"""`attnkit speed` on the linear family: generated inputs, the plan, a tiny real run with
the transformers-fallback rows (timings are not asserted: correctness only)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import attnkit as ak
from attnkit import registry
from attnkit.bench.linear_inputs import method_inputs
from attnkit.bench.speed import PEERS, make_inputs, peer_label
from attnkit.cli import app

runner = CliRunner()
LINEAR = [i.name for i in registry.methods(family="linear")]


@pytest.mark.parametrize("name", LINEAR)
def test_generated_inputs_are_valid_and_deterministic(name):
    """Every linear method runs on the inputs the benchmark generates for it (grouped
    heads: Hkv 2 of H 4), and the same seed gives the same tensors."""
    method = ak.get(name)
    q, k, v = make_inputs(70, 4, 2, 8, torch.float32, grouping=getattr(method, "grouping", "gqa"))
    inputs = method_inputs(method, q, k, v)
    again = method_inputs(method, q, k, v)
    assert inputs.keys() == again.keys() and all(torch.equal(inputs[x], again[x]) for x in inputs)
    assert set(inputs) == {x for x in getattr(method, "inputs", ()) if x != "initial_state"}
    causal = "causal" in method.info.supports
    out = method(q, k, v, causal=causal, **inputs)
    assert out.shape[2] == 70 and torch.isfinite(out).all()


def test_generated_input_shapes():
    q, k, v = make_inputs(33, 8, 4, 16, torch.float32, grouping="value")
    assert (q.shape[1], k.shape[1], v.shape[1]) == (4, 4, 8)
    gd = method_inputs(ak.get("gated_delta"), q, k, v)
    kda = method_inputs(ak.get("kda"), q, k, v)
    assert gd["g"].shape == (1, 8, 33) and gd["beta"].shape == (1, 8, 33)
    assert kda["g"].shape == (1, 8, 33, 16) and (kda["g"] <= 0).all()
    q, k, v = make_inputs(33, 8, 4, 16, torch.float32)
    gla = method_inputs(ak.get("gla"), q, k, v)
    assert gla["g"].shape == (1, 4, 33, 16) and gla["g"].min() > -1  # logsigmoid / 16


def test_speed_family_dry_run_lists_methods_inputs_and_peers():
    res = runner.invoke(app, ["speed", "--family", "linear", "--lengths", "4k,16k", "--dry-run"])
    assert res.exit_code == 0, res.output
    methods = next(ln for ln in res.output.splitlines() if ln.startswith("methods:"))
    assert methods.split(": ")[1].split(", ") == LINEAR
    for name in ("gla", "gated_delta", "kda", "delta"):
        assert f"inputs of {name}:" in res.output
    assert "inputs of gated_delta: g (B, Hv, N) = logsigmoid(randn); beta (B, Hv, N)" in res.output
    for name, (_, func) in PEERS.items():
        assert f"peer of {name}: transformers fallback {func}" in res.output
    assert "lengths: 4096, 16384" in res.output


def test_speed_family_and_methods_are_exclusive():
    res = runner.invoke(app, ["speed", "--family", "linear", "--methods", "gla", "--dry-run"])
    assert res.exit_code == 2 and "not both" in res.output
    res = runner.invoke(app, ["speed", "--family", "nope", "--dry-run"])
    assert res.exit_code == 2 and "nope" in res.output


def test_speed_linear_family_tiny_run(tmp_path):
    """N = 256, one repeat: a row for every linear method (and SDPA), and the transformers
    fallback rows of gated_delta and kda with outputs equal within 1e-4."""
    pytest.importorskip("transformers")
    out = tmp_path / "speed.json"
    res = runner.invoke(app, ["speed", "--family", "linear", "--lengths", "256", "--repeats", "1", "--heads", "4",
                              "--kv-heads", "2", "--dim", "16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"full", *LINEAR, *(peer_label(n) for n in PEERS)}
    for name in LINEAR:
        assert rows[name]["length"] == 256 and rows[name]["seconds"] > 0 and rows[name]["speedup_vs_sdpa"] > 0
    assert rows["agent"]["extra"]["causal"] is False and rows["gla"]["extra"]["causal"] is True
    for name in PEERS:
        extra = rows[name]["extra"]
        assert extra["transformers_max_rel_diff"] < 1e-4, extra
        assert extra["speedup_vs_transformers"] > 0
        assert rows[peer_label(name)]["backend"] == "transformers"
    assert "transformers" in res.output  # the table's column


def test_speed_linear_backward_tiny_run():
    """--backward: the delta-rule methods' output heads are the value heads (the output
    gradient must take their shape); no transformers rows."""
    res = runner.invoke(app, ["speed", "--backward", "--methods", "gla,gated_delta,kda", "--lengths", "128",
                              "--repeats", "1", "--heads", "4", "--kv-heads", "2", "--dim", "16"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output.strip().splitlines()[-1])["speed"]
    assert [r["method"] for r in rows] == ["full", "gla", "gated_delta", "kda"]
    assert all(r["extra"]["pass"] == "backward" for r in rows)


def test_hybrid_speed_tiny_run(tmp_path):
    """`attnkit hybrid-speed`: both sides run on each model, the patched side's last
    logits equal transformers' (timings are not asserted); bad models are refused."""
    pytest.importorskip("transformers.models.minimax.modeling_minimax")
    out = tmp_path / "hybrid.json"
    result = runner.invoke(app, ["hybrid-speed", "--models", "qwen3_next,kimi_linear,minimax", "--lengths", "300",
                                 "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["qwen3_next", "kimi_linear", "minimax"]
    for r in rows:
        assert r["length"] == 300 and r["transformers_s"] > 0 and r["attnkit_s"] > 0
        assert 0 < r["max_logit_diff"] < 1e-4, r  # > 0: the patched side really ran other kernels
    bad = runner.invoke(app, ["hybrid-speed", "--models", "mamba"])
    assert bad.exit_code == 2 and "unknown model" in bad.output and "mamba" in bad.output
