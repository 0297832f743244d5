"""SEA's trained estimator: calibration (distillation), the estimator file, exactness of the
kernel on the trained pattern, per-layer configs (registry.for_layer, attnkit.apply), and
the calibrate-sea command on the real model."""

from __future__ import annotations

import json
import math

import pytest
import torch

import attnkit as ak
from attnkit import registry
from attnkit.methods.sparse_dynamic import sea
from attnkit.reference import reference_attention


def _structured(n: int, hq: int, hkv: int, d: int = 16, seed: int = 0):
    """q, k where each query attends to keys of its own topic (one of 6 directions) plus noise."""
    g = torch.Generator().manual_seed(seed)
    topics = torch.nn.functional.normalize(torch.randn(6, d, generator=g), dim=1) * 3.0
    k_topic = torch.randint(0, 6, (n,), generator=g)
    q_topic = torch.randint(0, 6, (n,), generator=g)
    k = topics[k_topic] + 0.5 * torch.randn(1, hkv, n, d, generator=g)
    q = topics[q_topic] + 0.5 * torch.randn(1, hq, n, d, generator=g)
    v = torch.randn(1, hkv, n, d, generator=g)
    return q.contiguous(), k.contiguous(), v


@pytest.fixture(scope="module")
def estimator_file(tmp_path_factory):
    """A 2-layer estimator for Hq=4, Hkv=2, D=16, trained 60 steps on structured inputs."""
    captured = {}
    for layer in (0, 3):
        q, k, _ = _structured(384, 4, 2, seed=layer)
        captured[layer] = {"q": q, "k": k, "scale": None}
    est = sea.calibrate(captured, features=16, steps=60, rows=64, seed=1)
    path = tmp_path_factory.mktemp("sea") / "est.pt"
    sea.save_estimator(str(path), est, note="test")
    return str(path), est


def test_calibration_lowers_the_distillation_loss(estimator_file):
    _, est = estimator_file
    for layer in (0, 3):
        first, last = est[layer]["loss"].tolist()
        assert last < 0.9 * first, (layer, first, last)  # cross-entropy: the target entropy is a floor
        assert est[layer]["wq"].shape == (4, 16, 16) and est[layer]["wk"].shape == (2, 16, 16)


def test_estimator_file_round_trips(estimator_file):
    path, est = estimator_file
    data = sea.load_estimator(path)
    assert sorted(data["layers"]) == [0, 3] and data["meta"] == {"note": "test"}
    assert torch.equal(data["layers"][3]["wk"], est[3]["wk"])


@pytest.mark.parametrize("shape,causal", [((2, 4, 2, 301, 301), True), ((2, 4, 2, 301, 301), False),
                                          ((1, 4, 2, 77, 333), True)], ids=["B2-N301", "B2-N301-noncausal", "Nq77-Nk333"])
def test_trained_pattern_is_exact_and_sparse(estimator_file, shape, causal):
    b, hq, hkv, nq, nk = shape
    path, _ = estimator_file
    q, k, v = _structured(nk, hq, hkv, seed=9)
    q, k, v = q.expand(b, -1, -1, -1)[:, :, -nq:].contiguous(), k.expand(b, -1, -1, -1).contiguous(), v.expand(b, -1, -1, -1).contiguous()
    out, stats = ak.attention(q, k, v, method="sea", estimator=path, layer=3, block_size=16, topk=32, chunk=4,
                              sink=4, local=16, causal=causal, return_stats=True)
    expected = reference_attention(q.double(), k.double(), v.double(), causal=causal, mask=stats.pattern.dense_mask(b, hq))
    assert (out.double() - expected).abs().max().item() < 1e-4
    assert stats.density < 0.6


def test_trained_estimator_keeps_more_attention_mass_than_random_features(estimator_file):
    """On held-out inputs of the calibration's distribution, the trained map's pattern
    keeps more of the exact attention mass than the untrained random features."""
    path, _ = estimator_file
    q, k, v = _structured(384, 4, 2, seed=21)
    config = {"block_size": 16, "topk": 32, "chunk": 4, "sink": 4, "local": 16}
    probs = torch.softmax((q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) / 4).masked_fill(
        torch.ones(384, 384, dtype=torch.bool).triu(1), -math.inf), -1)

    def recall(**extra):
        _, st = ak.attention(q, k, v, method="sea", causal=True, return_stats=True, **config, **extra)
        return float((probs * st.pattern.dense_mask(1, 4)).sum() / probs.sum())

    trained, untrained = recall(estimator=path, layer=0), recall()
    assert trained > untrained, (trained, untrained)


def test_estimator_errors_are_clear(estimator_file, tmp_path):
    path, _ = estimator_file
    with pytest.raises(ValueError, match="layer=5 of method 'sea' is not in estimator"):
        ak.get("sea", estimator=path, layer=5)
    q, k, v = _structured(64, 2, 2)
    with pytest.raises(ValueError, match="needs layer=i, the model layer whose maps to use"):
        ak.attention(q, k, v, method="sea", estimator=path, causal=True)
    with pytest.raises(ValueError, match="calibrated for 4 query heads, 2 KV heads and head dim 16"):
        ak.attention(q, k, v, method="sea", estimator=path, layer=0, causal=True)
    bad = tmp_path / "bad.pt"
    torch.save({"method": "minference"}, bad)
    with pytest.raises(ValueError, match="is not a SEA estimator"):
        ak.get("sea", estimator=str(bad))
    bad.write_text("not a torch file")
    with pytest.raises(ValueError, match="could not be read"):
        ak.get("sea", estimator=str(bad))
    with pytest.raises(ValueError, match="steps and rows must be >= 1"):
        sea.calibrate({0: {"q": q, "k": k}}, steps=0)


def test_for_layer_fills_the_layer_of_per_layer_methods():
    assert registry.for_layer("sea", {"topk": 64}, 7) == {"topk": 64, "layer": 7}
    assert registry.for_layer("sea", {"layer": 2}, 7) == {"layer": 2}
    assert registry.for_layer("sea", {"layer": None}, 7) == {"layer": 7}
    assert registry.for_layer("minference", {"plan": "p.json"}, 4) == {"plan": "p.json", "layer": 4}
    assert registry.for_layer("streaming", {"window": 64}, 7) == {"window": 64}


@pytest.fixture(scope="module")
def smollm2_estimator(tmp_path_factory):
    """A 10-step estimator for SmolLM2's layer-3 shapes (9 query heads, 3 KV heads, D = 64),
    on structured stand-in q/k: this test is about the plumbing, not the estimate."""
    q, k, _ = _structured(512, 9, 3, d=64, seed=3)
    path = tmp_path_factory.mktemp("sea-model") / "smollm2-l3.pt"
    sea.save_estimator(str(path), sea.calibrate({3: {"q": q, "k": k, "scale": None}}, steps=10, rows=32))
    return str(path)


def test_apply_gives_each_layer_its_own_maps(smollm2, smollm2_estimator, license_text):
    from attnkit import patching

    model = smollm2.model
    ids = smollm2.tokenizer(license_text, return_tensors="pt").input_ids[:, :400]
    with torch.no_grad():
        exact = model(ids).logits
    with ak.patch(model, prefill="sea", layers=[3], estimator=smollm2_estimator, topk=64, local=64):
        assert patching.current_plan(model)[3].config["layer"] == 3
        assert patching.current_plan(model)[2] is None
        with torch.no_grad():
            patched = model(ids).logits
    assert torch.isfinite(patched).all()
    assert 0 < (patched - exact).abs().max().item() < 5.0  # one sparse layer: close, not identical
    with pytest.raises(ValueError, match="layer=2 of method 'sea' is not in estimator"):
        ak.apply(model, {"layers": {2: ("sea", {"estimator": smollm2_estimator})}})
    assert model.config._attn_implementation == "sdpa"  # a refused plan leaves the model as it was


def test_calibrate_sea_command_writes_an_estimator(tmp_path):
    """The command end to end on the real model (its own process, as a user runs it)."""
    import subprocess
    import sys

    out = tmp_path / "est.pt"
    result = subprocess.run([sys.executable, "-m", "attnkit.cli", "calibrate-sea", "--out", str(out), "--tokens", "256",
                             "--layers", "1,4", "--steps", "3", "--features", "8"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["layers"] == [1, 4]
    data = sea.load_estimator(str(out))
    assert sorted(data["layers"]) == [1, 4] and data["layers"][1]["wq"].shape == (9, 8, 64)
    assert data["meta"]["text"] == "pydoc" and data["meta"]["tokens"] == 256
