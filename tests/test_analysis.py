"""attnkit.analysis: sampled-row head scores against scores of the full dense attention
(eager, output_attentions, computed here independently), a constructed sink head, JSON
round trip, peak memory at a length where N x N would be large, the CLI dry run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnkit import analysis
from attnkit.analysis import HeadProfile, profile

ROOT = Path(__file__).parent.parent


def tiny(seed: int = 0, layers: int = 2, positions: int = 512, attention_bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                         initializer_range=0.1, attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, attention_bias=attention_bias)
    return LlamaForCausalLM(config).eval()


def dense_attentions(model, ids):
    """(L, Hq, N, N) float64 attention probabilities from eager attention."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    model.config.output_attentions = True
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(before)
    return torch.stack([a[0] for a in out.attentions]).double()


def dense_scores(a: torch.Tensor, sink_tokens: int, window: int, alpha: float):
    """The profile's scores from full (L, H, N, N) attention, written naively."""
    L, H, N, _ = a.shape
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    sink = a[..., :sink_tokens].sum(-1).mean(-1)
    stream = (a * ((j < sink_tokens) | (j > i - window))).sum(-1).mean(-1)
    ent_rows = -(a * torch.log(a.clamp_min(1e-300))).sum(-1)  # (L, H, N)
    entropy = ent_rows.mean(-1)
    length = torch.arange(1, N + 1).double()
    entropy_norm = (ent_rows[..., 1:] / torch.log(length[1:])).mean(-1)
    hidden, hidden_mass = [], torch.zeros(L, H, dtype=torch.float64)
    for l in range(L):
        per_layer = []
        for h in range(H):
            found = []
            for col in range(sink_tokens, N):
                rows = torch.arange(min(col + window, N), N)
                if len(rows) < max(1, N // 8):
                    continue
                ratio = (a[l, h, rows, col] * (rows + 1)).mean()
                if ratio > alpha:
                    found.append((col, float(a[l, h, rows, col].mean()), float(a[l, h, rows, col].sum()) / N))
            per_layer.append(sorted(found, key=lambda x: -x[1]))
            hidden_mass[l, h] = sum(x[2] for x in found)
        hidden.append(per_layer)
    return {"sink": sink, "streaming": stream, "entropy": entropy, "entropy_norm": entropy_norm, "hidden": hidden,
            "hidden_sink_mass": hidden_mass}


@pytest.mark.parametrize("n", [37, 130])
def test_sampled_scores_equal_dense(n):
    model = tiny()
    ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(n))
    prof = profile(model, ids, sample_rows=n, sink_tokens=4, window=8, alpha=1.5, max_hidden=1000, chunk=16)
    want = dense_scores(dense_attentions(model, ids), 4, 8, 1.5)
    for name in ("sink", "streaming", "entropy", "entropy_norm", "hidden_sink_mass"):
        torch.testing.assert_close(getattr(prof, name), want[name], atol=1e-6, rtol=0, msg=name)
    assert prof.meta["rows"] == n
    for l in range(prof.layers):
        for h in range(prof.heads):
            got = prof.hidden_sinks[l][h]
            assert [p for p, _ in got] == [x[0] for x in want["hidden"][l][h]]
            assert [m for _, m in got] == pytest.approx([x[1] for x in want["hidden"][l][h]], abs=1e-6)
    assert sum(len(x) for layer in want["hidden"] for x in layer) > 0  # the comparison is not vacuous
    # A-shape and block-sparse recall at the default budget: 64 keys per row (one block)
    a = dense_attentions(model, ids)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    a_shape = (a * ((j < 8) | (j > i - 56))).sum(-1).mean(-1)
    blocks = torch.nn.functional.pad(a, (0, -n % 64)).unflatten(-1, (-1, 64)).sum(-1)
    torch.testing.assert_close(prof.pattern_recall[..., 0], a_shape, atol=1e-6, rtol=0)
    torch.testing.assert_close(prof.pattern_recall[..., 2], blocks.max(-1).values.mean(-1), atol=1e-6, rtol=0)
    assert prof.pattern_recall.shape == (2, 4, 3)
    assert ((prof.pattern_recall >= 0) & (prof.pattern_recall <= 1 + 1e-9)).all()


def test_sampled_rows_equal_dense_on_those_rows():
    """With fewer rows than N, the scores are the dense scores of the sampled rows."""
    model = tiny()
    n = 150
    ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(7))
    prof = profile(model, ids, sample_rows=20, sink_tokens=2, window=16)
    rows = analysis.sample_rows(n, 20)
    a = dense_attentions(model, ids)[:, :, rows]
    j = torch.arange(n)[None, :]
    torch.testing.assert_close(prof.sink, a[..., :2].sum(-1).mean(-1), atol=1e-6, rtol=0)
    local = (j < 2) | (j > rows[:, None] - 16)
    torch.testing.assert_close(prof.streaming, (a * local).sum(-1).mean(-1), atol=1e-6, rtol=0)
    ent = -(a * torch.log(a.clamp_min(1e-300))).sum(-1).mean(-1)
    torch.testing.assert_close(prof.entropy, ent, atol=1e-6, rtol=0)


def test_sampled_rows_are_last_plus_uniform():
    rows = analysis.sample_rows(1000, 100)
    assert len(rows) == 100 and rows[-25:].tolist() == list(range(975, 1000)) and rows[0] == 0
    assert analysis.sample_rows(50, 100).tolist() == list(range(50))


def test_head_attending_to_token_0_has_sink_score_one():
    """Layer 0, KV head 0: keys are made to depend on the first token only, huge there: its
    two query heads put (almost) all mass on position 0."""
    from attnkit.analysis.scores import head_scores

    torch.manual_seed(0)
    q = torch.randn(1, 4, 200, 16)
    k = torch.randn(1, 2, 200, 16) * 0.01
    q[:, :2] = q[:, :2].abs() + 1.0
    k[0, 0, 0] = 40.0
    s = head_scores(q, k, sample_rows_=64, sink_tokens=1, window=4)
    assert s["sink"][:2].min() > 0.999
    assert s["sink"][2:].max() < 0.5
    assert s["streaming"][:2].min() > 0.999
    assert s["entropy_norm"][:2].max() < 0.01
    assert s["pattern"][:2].tolist() == [0, 0]  # A-shape holds a sink


def test_model_head_patched_to_sink_on_token_0():
    """A model patched so that in layer 0 the key of token 5 (placed at position 0) is huge
    along the slowest RoPE pair and query heads 0, 1 have a bias along it: they attend to
    position 0 only (sink ~1); heads 2, 3 (the other KV head) are untouched."""
    model = tiny(attention_bias=True)
    attn = model.model.layers[0].self_attn
    d = attn.head_dim  # 16; rotate_half pairs dim j with j + d/2, the slowest is j = d/2 - 1
    slow = d // 2 - 1
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[5] = 0.0
        emb[5, 0] = 1.0  # after RMSNorm: 8 along hidden dim 0, nothing else
        attn.k_proj.weight[slow] = 0.0
        attn.k_proj.weight[slow, 0] = 20.0  # KV head 0: key of token 5 = 160 along the slow pair
        for h in (0, 1):
            attn.q_proj.weight[h * d + slow] = 0.0
            attn.q_proj.bias[h * d + slow] = 1.0  # score of position 0: 160 x 0.25 = 40
    ids = torch.randint(6, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = 5
    prof = profile(model, ids, sample_rows=64, sink_tokens=1, window=4)
    assert prof.sink[0, :2].min() > 0.99, prof.sink
    assert prof.sink[0, 2:].max() < 0.5
    assert prof.top("sink", 2) == [(0, h, pytest.approx(prof.sink[0, h].item())) for h in
                                   sorted((0, 1), key=lambda h: -prof.sink[0, h].item())]
    assert prof.pattern[0, :2].tolist() == [0, 0]


def test_json_round_trip(tmp_path):
    model = tiny()
    ids = torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(0))
    prof = profile(model, ids, sample_rows=32)
    prof.retrieval[0, 1] = 0.5
    path = tmp_path / "p.json"
    prof.to_json(path)
    back = HeadProfile.from_json(path)
    for name in analysis.SCORES:
        torch.testing.assert_close(back.score(name), prof.score(name), equal_nan=True)
    torch.testing.assert_close(back.pattern_recall, prof.pattern_recall)
    assert back.pattern.tolist() == prof.pattern.tolist()
    assert back.hidden_sinks == prof.hidden_sinks and back.meta == prof.meta
    assert back.top("retrieval", 3) == [(0, 1, 0.5)]
    assert prof.top("sink", 2)[0][2] == prof.sink.max().item()
    assert prof.top("entropy", 1)[0][2] == prof.entropy.min().item()
    data = json.loads(path.read_text())
    data["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        HeadProfile.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="schema"):
        HeadProfile.from_json('{"a": 1}')
    with pytest.raises(ValueError, match="unknown score"):
        prof.top("nope")


MEMORY_SCRIPT = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from test_analysis import tiny
from attnkit.analysis import profile
n = int(sys.argv[2])
model = tiny(layers=1, positions=n)
ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(0))
profile(model, ids[:, :256], sample_rows=64)  # warm up (imports, allocator)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
prof = profile(model, ids, sample_rows=64)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(after - before, prof.meta["rows"])
"""


def test_peak_memory_far_below_n_squared():
    n = 8192
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(Path(__file__).parent), str(n)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    growth, rows = map(int, res.stdout.split())
    assert rows == 64
    assert growth < n * n * 4 / 4, f"peak RSS grew by {growth / 2**20:.0f} MiB (N x N float32 = {n * n * 4 / 2**20:.0f} MiB)"


def test_copy_paste_scores_by_hand():
    from attnkit.analysis.retrieval import copy_paste_scores

    input_ids = torch.tensor([9, 9, 7, 8, 6, 9])  # needle = positions 2..5 (tokens 7, 8, 6)
    generated = torch.tensor([7, 8, 6])
    top = torch.zeros(3, 1, 3, dtype=torch.long)
    top[:, 0, 0] = torch.tensor([2, 3, 4])  # head 0 copies all three
    top[:, 0, 1] = torch.tensor([2, 2, 0])  # head 1 copies token 7 once (counted once)
    top[:, 0, 2] = torch.tensor([3, 4, 5])  # head 2 looks one ahead: tokens differ, and 5 is outside
    got = copy_paste_scores(top, generated, input_ids, (2, 5))
    assert got.tolist() == [[1.0, 1 / 3, 0.0]]
    with pytest.raises(ValueError, match="span"):
        copy_paste_scores(top, generated, input_ids, (4, 9))


def test_trace_generation_mechanics():
    """Tiny random model: one argmax per (generated token, layer, head), inside the visible
    keys; the greedy tokens equal plain generate's."""
    from attnkit.analysis.retrieval import copy_paste_scores, trace_generation

    model = tiny()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    generated, top = trace_generation(model, ids, 6)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                               do_sample=False, pad_token_id=0)[0, 40:]
    assert generated.tolist() == plain.tolist()
    assert top.shape == (len(generated), 2, 4)
    visible = torch.arange(len(generated))[:, None, None] + 40
    assert ((top >= 0) & (top < visible)).all()
    scores = copy_paste_scores(top, generated, ids[0], (10, 20))
    assert scores.shape == (2, 4) and ((scores >= 0) & (scores <= 1)).all()


def test_cli_dry_run(tmp_path):
    from typer.testing import CliRunner

    from attnkit.cli import app

    out = tmp_path / "a"
    res = CliRunner().invoke(app, ["analyze", "--model", "smollm2-135m", "--length", "1k", "--out", str(out),
                                   "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "model: smollm2-135m (30 layers)" in res.output
    assert "length: 1024 tokens" in res.output
    assert f"would write: {out / 'profile.json'}" in res.output
    assert not out.exists()
    bad = CliRunner().invoke(app, ["analyze", "--length", "1k", "--budget", "2", "--dry-run"])
    assert bad.exit_code == 2 and "budget" in bad.output


def test_figures_and_page(tmp_path):
    """PNG heatmaps (kaleido or the stdlib raster) and the HTML page of a tiny profile."""
    from attnkit.analysis.figures import heat_kinds, raster_png, write_page, write_png

    from attnkit.analysis.figures import chosen_heads, write_map_png

    model = tiny()
    prof = profile(model, torch.randint(3, 128, (1, 70), generator=torch.Generator().manual_seed(0)), sample_rows=16,
                   map_bins=8)
    assert "retrieval" not in heat_kinds(prof) and "pattern" in heat_kinds(prof)
    pngs = {k: write_png(prof, k, tmp_path / f"{k}.png") for k in heat_kinds(prof)}
    for k in pngs:
        assert (tmp_path / f"{k}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raster_png(torch.tensor([[0.0, float("nan")], [1.0, 0.5]]), tmp_path / "r.png", cell=3)
    data = (tmp_path / "r.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(data[16:20], "big") == 6
    picks = chosen_heads(prof)
    assert picks and len({(l, h) for _, l, h in picks}) == len(picks)
    maps = [(why, l, h, write_map_png(prof, l, h, why, tmp_path / f"m{l}{h}.png")) for why, l, h in picks]
    assert all((tmp_path / f"m{l}{h}.png").read_bytes()[:4] == b"\x89PNG" for _, l, h, _ in maps)
    write_page(prof, tmp_path / "a.html", {k: f"{k}.png ({v})" for k, v in pngs.items()}, maps=maps)
    page = (tmp_path / "a.html").read_text()
    assert "Plotly.newPlot" in page and "MInference pattern class" in page and "Attention maps of chosen heads" in page


def test_sliding_window_layers_use_their_mask():
    """A Mistral with a 16-token sliding window: the scores follow the layer's own mask."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, sliding_window=16,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    n = 60
    ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(2))
    prof = profile(model, ids, sample_rows=n, sink_tokens=4, window=8)
    a = dense_attentions(model, ids)
    assert a[0, 0, -1, : n - 16].abs().max() == 0  # eager applies the window
    want = dense_scores(a, 4, 8, 5.0)
    for name in ("sink", "streaming", "entropy"):
        torch.testing.assert_close(getattr(prof, name), want[name], atol=1e-6, rtol=0, msg=name)


def test_coarse_maps_equal_pooled_dense_attention():
    model = tiny()
    n = 64
    ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(4))
    prof = profile(model, ids, sample_rows=n, map_bins=8)
    a = dense_attentions(model, ids)  # (L, H, N, N)
    pooled = a.unflatten(-1, (8, 8)).sum(-1).unflatten(-2, (8, 8)).mean(-2)
    torch.testing.assert_close(prof.maps, pooled, atol=1e-6, rtol=0)
    assert HeadProfile.from_json(prof.to_json()).maps is None
