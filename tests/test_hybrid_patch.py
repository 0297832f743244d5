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
mk = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
mm = pytest.importorskip("transformers.models.minimax.modeling_minimax")
mq35 = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
mo = pytest.importorskip("transformers.models.olmo_hybrid.modeling_olmo_hybrid")
mq35m = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")

SMALL_GDN = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, layer_types=["linear_attention", "full_attention"] * 2,
                 linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                 pad_token_id=0, eos_token_id=2)


def tiny_qwen3_5(seed: int = 0):
    """Qwen3.5's text model: 4 layers (GDN, full, GDN, full), Hv = 2 Hk."""
    torch.manual_seed(seed)
    return transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(head_dim=16, **SMALL_GDN)).eval()


def tiny_qwen3_5_moe(seed: int = 0):
    """Qwen3.5-MoE's text model: as Qwen3.5 with a small MoE."""
    torch.manual_seed(seed)
    config = transformers.Qwen3_5MoeTextConfig(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                               **SMALL_GDN)
    return transformers.Qwen3_5MoeForCausalLM(config).eval()


def tiny_olmo_hybrid(seed: int = 0):
    """OLMo-hybrid: 4 layers (GDN with beta in [0, 2], full, GDN, full)."""
    torch.manual_seed(seed)
    return transformers.OlmoHybridForCausalLM(transformers.OlmoHybridConfig(**SMALL_GDN)).eval()


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


def tiny_kimi_linear(seed: int = 0):
    """4 layers (KDA, MLA, KDA, MLA), a small MoE."""
    config = transformers.KimiLinearConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, num_experts=4, num_experts_per_token=2, linear_head_dim=16,
        linear_num_heads=4, layer_types=["linear_attention", "full_attention"] * 2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.KimiLinearForCausalLM(config).eval()


def tiny_minimax(seed: int = 0):
    """4 layers (lightning, softmax, lightning, softmax), block_size 16, a small MoE."""
    config = transformers.MiniMaxConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, block_size=16,
        layer_types=["linear_attention", "full_attention"] * 2, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.MiniMaxForCausalLM(config).eval()


# architecture -> (tiny model, modeling file, swapped (chunk, recurrent) function names or None when the
# layer's forward is replaced, attnkit kernel prefix or None for the lightning method, method)
ARCHS = {
    "qwen3_next": (tiny_qwen3_next, mq, ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"),
                   "gated_delta_rule", "gated_delta"),
    "kimi_linear": (tiny_kimi_linear, mk, ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention"),
                    "kda", "kda"),
    "minimax": (tiny_minimax, mm, None, None, "lightning"),
    "qwen3_5": (tiny_qwen3_5, mq35, ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"),
                "gated_delta_rule", "gated_delta"),
    "qwen3_5_moe": (tiny_qwen3_5_moe, mq35m, ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"),
                    "gated_delta_rule", "gated_delta"),
    "olmo_hybrid": (tiny_olmo_hybrid, mo, ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"),
                    "gated_delta_rule", "gated_delta"),
}


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return ARCHS[request.param]


@pytest.fixture
def counted(monkeypatch, arch):
    """Calls of attnkit's kernels for the architecture, by form."""
    calls = {"chunk": 0, "recurrent": 0}
    if arch[3] is None:  # the lightning method: its run(q, k, v, causal, scale, form, inputs)
        from attnkit.methods.linear.lightning import Lightning

        original_run = Lightning.run

        def run(self, q, k, v, causal, scale, form, inputs):
            calls[form] += 1
            return original_run(self, q, k, v, causal, scale, form, inputs)

        monkeypatch.setattr(Lightning, "run", run)
        return calls
    for form in calls:
        name = f"{arch[3]}_{form}"
        original = getattr(delta_rule, name)

        def spy(*args, _form=form, _original=original, **kwargs):
            calls[_form] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(delta_rule, name, spy)
    return calls


def swapped(modeling, names) -> tuple:
    """The module-level functions attnkit swaps (empty when it replaces the layer's forward)."""
    return tuple(getattr(modeling, name) for name in names or ())


@torch.no_grad()
def test_logits_equal_and_unpatch_restores(arch, counted):
    build, modeling, names, _, method = arch
    model = build()
    originals = swapped(modeling, names)
    ids = torch.randint(3, 128, (1, 150), generator=torch.Generator().manual_seed(1))  # > 2 chunks of 64
    ref = model(ids).logits
    with ak.patch(model):
        out = model(ids).logits
        assert model.attnkit_assignment[0].startswith(method) and model.attnkit_assignment[1] == "exact"
    assert counted["chunk"] == 2  # both linear layers, prefill
    assert (out - ref).abs().max() < 1e-4
    assert swapped(modeling, names) == originals
    assert all("forward" not in vars(module) for module in model.modules())
    assert not hasattr(model, "attnkit_assignment")


@torch.no_grad()
def test_greedy_generate_same_tokens(arch, counted):
    model = arch[0]()
    ids = torch.randint(3, 128, (1, 70), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    with ak.patch(model):
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)
    assert counted["chunk"] == 2 and counted["recurrent"] == 2 * 11  # decode: the recurrent kernel, cache state


@torch.no_grad()
def test_left_padded_batch(arch, counted):
    model = arch[0]()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 40), generator=gen)
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
def test_only_the_patched_model_uses_attnkit(arch, counted):
    """The swapped functions run attnkit only inside a patched model's layers."""
    build, modeling, names = arch[:3]
    patched, other = build(), build(seed=1)
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    with ak.patch(patched):
        other(ids)
        assert counted["chunk"] == 0
        with ak.patch(other):  # nested: the inner exit leaves the outer patch working
            other(ids)
        assert counted["chunk"] == 2 and all(f.attnkit_adapter for f in swapped(modeling, names))
        patched(ids)
        assert counted["chunk"] == 4
    assert not any(hasattr(f, "attnkit_adapter") for f in swapped(modeling, names))


@torch.no_grad()
def test_apply_and_unpatch_with_a_prefill_method(arch, counted):
    build, modeling, names = arch[:3]
    model = build()
    ids = torch.randint(3, 128, (1, 50), generator=torch.Generator().manual_seed(5))
    ref = model(ids).logits
    ak.apply(model, "full")
    ak.apply(model, ("streaming", {"sink": 4, "window": 1024}))  # again: replaces the plan (exact at N=50)
    out = model(ids).logits
    ak.unpatch(model)
    assert (out - ref).abs().max() < 1e-4 and counted["chunk"] == 2
    assert not any(hasattr(f, "attnkit_adapter") for f in swapped(modeling, names))
    assert all("forward" not in vars(module) for module in model.modules())
