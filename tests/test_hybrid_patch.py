"""transformers' hybrid models (linear + softmax layers) under ``attnkit.patch``: the
linear layers run attnkit's delta-rule kernels instead of transformers' pure-PyTorch
fallbacks, with equal logits, equal greedy tokens (decode through the cache's recurrent
state) and left-padded batches; ``unpatch`` restores everything."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.methods.linear import delta_rule

transformers = pytest.importorskip("transformers")
mq = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")


def tiny_qwen3_next(seed: int = 0):
    """4 layers (linear, full, linear, full), GDN with Hv = 2 Hk, a small MoE."""
    config = transformers.Qwen3NextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, full_attention_interval=2)
    assert config.layer_types == ["linear_attention", "full_attention"] * 2
    torch.manual_seed(seed)
    return transformers.Qwen3NextForCausalLM(config).eval()


@pytest.fixture
def counted(monkeypatch):
    """Calls of attnkit's gated delta kernels, by form."""
    calls = {"chunk": 0, "recurrent": 0}
    for form in calls:
        name = f"gated_delta_rule_{form}"
        original = getattr(delta_rule, name)

        def spy(*args, _form=form, _original=original, **kwargs):
            calls[_form] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(delta_rule, name, spy)
    return calls


@torch.no_grad()
def test_logits_equal_and_unpatch_restores(counted):
    model = tiny_qwen3_next()
    originals = (mq.torch_chunk_gated_delta_rule, mq.torch_recurrent_gated_delta_rule)
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(1))  # > 2 chunks of 64
    ref = model(ids).logits
    with ak.patch(model):
        out = model(ids).logits
        assert "gated_delta" in model.attnkit_assignment[0] and model.attnkit_assignment[1] == "exact"
    assert counted["chunk"] == 2  # both linear layers, prefill
    assert (out - ref).abs().max() < 1e-4
    assert (mq.torch_chunk_gated_delta_rule, mq.torch_recurrent_gated_delta_rule) == originals
    assert "forward" not in vars(model.model.layers[0].linear_attn)
    assert not hasattr(model, "attnkit_assignment")


@torch.no_grad()
def test_greedy_generate_same_tokens(counted):
    model = tiny_qwen3_next()
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    with ak.patch(model):
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)
    assert counted["chunk"] == 2 and counted["recurrent"] == 2 * 11  # decode: the recurrent kernel, cache state


@torch.no_grad()
def test_left_padded_batch(counted):
    model = tiny_qwen3_next()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (2, 40), generator=gen)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :13] = 0  # row 1 left-padded
    ids[1, :13] = 0
    ref = model(ids, attention_mask=mask).logits
    ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with ak.patch(model):
        out = model(ids, attention_mask=mask).logits
        out_gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert (out - ref)[mask.bool()].abs().max() < 1e-4
    assert torch.equal(out_gen, ref_gen)
    assert counted["recurrent"] > 0


@torch.no_grad()
def test_only_the_patched_model_uses_attnkit(counted):
    """The swapped functions run attnkit only inside a patched model's layers."""
    patched, other = tiny_qwen3_next(), tiny_qwen3_next(seed=1)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    with ak.patch(patched):
        other(ids)
        assert counted["chunk"] == 0
        with ak.patch(other):  # nested: the inner exit leaves the outer patch working
            other(ids)
        assert counted["chunk"] == 2 and mq.torch_chunk_gated_delta_rule.attnkit_adapter
        patched(ids)
        assert counted["chunk"] == 4
    assert not hasattr(mq.torch_chunk_gated_delta_rule, "attnkit_adapter")


@torch.no_grad()
def test_apply_and_unpatch_with_a_prefill_method(counted):
    model = tiny_qwen3_next()
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(5))
    ref = model(ids).logits
    ak.apply(model, "full")
    ak.apply(model, ("streaming", {"sink": 4, "window": 1024}))  # again: replaces the plan (exact at N=50)
    out = model(ids).logits
    ak.unpatch(model)
    assert (out - ref).abs().max() < 1e-4 and counted["chunk"] == 2
    assert not hasattr(mq.torch_chunk_gated_delta_rule, "attnkit_adapter")
