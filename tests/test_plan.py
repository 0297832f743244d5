"""ak.plan(profile) -> Plan: roles from hand-made profiles, JSON round trip and refusals,
apply(model, plan) on a tiny Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

import attnkit as ak
from attnkit.analysis import HeadProfile


def hand_profile(streaming, retrieval=None) -> HeadProfile:
    s = torch.tensor(streaming, dtype=torch.float64)
    z = torch.zeros_like(s)
    return HeadProfile(sink=z, hidden_sink_mass=z, entropy=z, entropy_norm=z, streaming=s,
                       pattern_recall=torch.zeros(*s.shape, 3, dtype=torch.float64),
                       pattern=torch.zeros(s.shape, dtype=torch.long),
                       hidden_sinks=[[[] for _ in range(s.shape[1])] for _ in range(s.shape[0])],
                       retrieval=None if retrieval is None else torch.tensor(retrieval, dtype=torch.float64))


def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.1, attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


# 2 layers x 4 query heads, GQA to 2 KV heads (query heads 0,1 -> KV 0; 2,3 -> KV 1)
STREAMING = [[0.95, 0.97, 0.50, 0.40],   # layer 0: KV0 mean 0.96 (streaming), KV1 mean 0.45
             [0.20, 0.10, 0.60, 0.70]]   # layer 1: KV0 mean 0.15 (most far-looking), KV1 mean 0.65


def test_roles_from_streaming_when_no_retrieval_score():
    p = ak.plan(hand_profile(STREAMING), kv_heads=2, retrieval_share=0.25)
    # 1 - streaming per KV head: L0 [0.04, 0.55], L1 [0.85, 0.35] -> 1 of 4 retrieval: (1, 0)
    assert p.roles == [["streaming", "sparse"], ["retrieval", "sparse"]]
    assert p.meta["score"] == "1 - streaming"
    # layer 0 ties streaming/sparse -> sparse; layer 1 ties retrieval/sparse -> retrieval (full)
    assert p.prefill == ["vertical_slash", "full"]
    assert p.counts() == {"retrieval": 1, "streaming": 1, "sparse": 2}


def test_retrieval_score_ranks_when_present():
    retrieval = [[0.0, 0.0, 0.9, 0.7], [0.0, math.nan, 0.1, 0.0]]
    p = ak.plan(hand_profile(STREAMING, retrieval), kv_heads=2, retrieval_share=0.5, streaming_threshold=0.9)
    # KV means: L0 [0, 0.8], L1 [0 (NaN as 0), 0.05] -> top 2: (0, 1), (1, 1)
    assert p.roles == [["streaming", "retrieval"], ["sparse", "retrieval"]]
    assert p.meta["score"] == "retrieval"
    p = ak.plan(hand_profile(STREAMING, retrieval), kv_heads=2, retrieval_share=0.0, streaming_threshold=0.1)
    assert p.roles == [["streaming"] * 2, ["streaming"] * 2] and p.prefill == ["streaming"] * 2
    assert p.prefill_config == {"streaming": {"sink": 4, "window": 256}}


def test_json_round_trip_and_refusals(tmp_path):
    p = ak.plan(hand_profile(STREAMING), kv_heads=2, budget=64)
    path = tmp_path / "plan.json"
    p.to_json(path)
    q = ak.Plan.from_json(path)
    assert q == p
    assert ak.Plan.from_json(p.to_json()) == p
    rec = json.loads(p.to_json())

    def bad(**change):
        return json.dumps({**rec, **change})

    with pytest.raises(ValueError, match="expected schema 'attnkit.plan'"):
        ak.Plan.from_json(bad(schema="attnkit.head_profile"))
    with pytest.raises(ValueError, match="version 2 is not supported"):
        ak.Plan.from_json(bad(version=2))
    with pytest.raises(ValueError, match="record says 3 layers"):
        ak.Plan.from_json(bad(layers=3))
    with pytest.raises(ValueError, match="unknown prefill method 'nope'; allowed: .*vertical_slash"):
        ak.Plan.from_json(bad(prefill=["nope", "full"]))
    with pytest.raises(ValueError, match="unknown cache policy 'vertical_slash'; allowed: .*snapkv"):
        ak.Plan.from_json(bad(cache="vertical_slash"))
    with pytest.raises(ValueError, match="unknown role 'fast'"):
        ak.Plan.from_json(bad(roles=[["fast", "sparse"], ["sparse", "sparse"]]))
    model = tiny()
    ak.Plan.from_json(path, model=model)
    wrong = ak.plan(hand_profile([[0.5] * 4] * 3), kv_heads=2)
    with pytest.raises(ValueError, match="plan has 3 layers, the model has 2"):
        ak.Plan.from_json(wrong.to_json(), model=model)
    wrong = ak.plan(hand_profile(STREAMING), kv_heads=4)
    with pytest.raises(ValueError, match="plan has 4 KV heads per layer, the model has 2"):
        ak.apply(model, wrong)
    with pytest.raises(ValueError, match="kv_heads=3 must divide"):
        ak.plan(hand_profile(STREAMING), kv_heads=3)


def test_apply_plan_to_tiny_llama_and_unpatch():
    model = tiny()
    ids = torch.randint(3, 128, (1, 96))
    with torch.no_grad():
        before = model(ids).logits
    p = ak.plan(hand_profile(STREAMING), kv_heads=2, budget=32,
                prefill="streaming", streaming={"sink": 4, "window": 16})
    assert p.prefill == ["streaming", "full"]
    ak.apply(model, p)
    try:
        assert model.attnkit_plan is p
        assert "streaming" in model.attnkit_assignment[0] and "exact" in model.attnkit_assignment[1]
        assert p.cache_args()["policy"] == "duo" and p.cache_args()["plan"] == {0: [0, 0], 1: [1, 0]}
        with torch.no_grad():
            sparse = model(ids).logits
        assert torch.isfinite(sparse).all() and not torch.allclose(sparse, before, atol=1e-5)
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
        assert type(cache).__name__ == "KVCache" and cache.policy.name == "duo"
        kept = (cache.kept_positions(1)[0] >= 0).sum(-1).tolist()  # layer 1: KV0 retrieval, KV1 not
        assert kept[0] >= 96 and kept[1] == 32
        assert (cache.kept_positions(0)[0] >= 0).sum(-1).tolist() == [32, 32]
    finally:
        ak.unpatch(model)
    assert not hasattr(model, "attnkit_plan") and "generate" not in model.__dict__
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-6)


def test_docs_example_runs(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "analysis.md").read_text()
    code = re.findall(r"```python\n(.*?)```", doc.split("## Plans")[1], re.S)[0]
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "plan.json").exists()
