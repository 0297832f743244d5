"""attnkit.patching: methods inside a real transformers model, and back out again."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import attnkit as ak  # noqa: E402
from attnkit import layer_attention, patching  # noqa: E402
from attnkit.patching import LayerMethod  # noqa: E402


@pytest.fixture(scope="module")
def ids(smollm2, license_text):
    """(1, 600) token ids of real English text."""
    out = smollm2.tokenizer(license_text, return_tensors="pt").input_ids[:, :600]
    assert out.shape[1] == 600
    return out


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


@pytest.fixture(scope="module")
def exact_logits(smollm2, ids):
    """Unpatched logits on the first 300 and all 600 tokens."""
    return {n: logits(smollm2.model, ids[:, :n]) for n in (300, 600)}


def test_full_matches_unpatched(smollm2, ids, exact_logits):
    model = smollm2.model
    with ak.patch(model, prefill="full"):
        assert model.config._attn_implementation == patching.IMPLEMENTATION
        patched = logits(model, ids[:, :300])
    assert model.config._attn_implementation == "sdpa"
    assert patching.current_plan(model)[0] is None
    assert (patched - exact_logits[300]).abs().max().item() < 1e-5


def test_apply_then_unpatch_is_identity(smollm2, ids, exact_logits):
    model = smollm2.model
    ak.apply(model, "full")
    try:
        assert patching.current_plan(model)[29] == LayerMethod("full")
        assert (logits(model, ids[:, :300]) - exact_logits[300]).abs().max().item() < 1e-5
    finally:
        ak.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert all(m is None for m in patching.current_plan(model).values())
    assert torch.equal(logits(model, ids[:, :300]), exact_logits[300])


def test_streaming_changes_logits(smollm2, ids, exact_logits):
    sink, window = 4, 64
    with ak.patch(smollm2.model, prefill="streaming", sink=sink, window=window):
        patched = logits(smollm2.model, ids)
    diff = (patched - exact_logits[600]).abs()
    # Queries that see no more than sink + window keys attend to everything: exact there.
    assert diff[:, :window].max().item() < 1e-4
    assert diff[:, window + sink:].max().item() > 1e-1


def test_layers_subset(smollm2, ids, exact_logits):
    model = smollm2.model
    with ak.patch(model, prefill="streaming", layers=[0], sink=4, window=16):
        plan = patching.current_plan(model)
        assert plan[0] == LayerMethod("streaming", {"sink": 4, "window": 16})
        assert plan[1] is None
        one_layer = logits(model, ids[:, :300])
    assert (one_layer - exact_logits[300]).abs().max().item() > 1e-3


def test_dense_layers_keep_the_first_layers_exact(smollm2, ids, exact_logits):
    """dense_layers=N (MInference's starting_layer): layers 0..N-1 exact, the rest patched;
    with N = all layers the model is exact."""
    model = smollm2.model
    n_layers = model.config.num_hidden_layers
    with ak.patch(model, prefill="streaming", dense_layers=2, sink=4, window=16):
        plan = patching.current_plan(model)
        assert plan[0] is None and plan[1] is None
        assert all(plan[i] == LayerMethod("streaming", {"sink": 4, "window": 16}) for i in range(2, n_layers))
    with ak.patch(model, prefill="streaming", dense_layers=n_layers, sink=4, window=16):
        assert (logits(model, ids[:, :300]) - exact_logits[300]).abs().max().item() < 1e-4


def test_apply_plan_forms(smollm2):
    model = smollm2.model
    try:
        ak.apply(model, {"default": "full", "layers": {3: ("streaming", {"window": 32}), 4: None}})
        plan = patching.current_plan(model)
        assert plan[0] == LayerMethod("full") and plan[4] is None
        assert plan[3] == LayerMethod("streaming", {"window": 32})
        ak.apply(model, {5: "streaming"})  # re-applying replaces the plan
        plan = patching.current_plan(model)
        assert plan[5] == LayerMethod("streaming") and plan[3] is None and plan[0] is None
    finally:
        ak.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert all(m is None for m in patching.current_plan(model).values())


def test_restored_after_exception(smollm2):
    model = smollm2.model
    with pytest.raises(RuntimeError, match="boom"):
        with ak.patch(model, prefill="streaming", window=8):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert patching.current_plan(model)[0] is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prefill="no_such_method"), "no_such_method"),
        (dict(prefill="streaming", no_such_field=1), "no_such_field"),
        (dict(prefill="full", cache="snapkv"), "needs budget"),
        (dict(prefill="full", layers=[30]), "layers"),
        (dict(prefill="full", dense_layers=-1), "dense_layers"),
        (dict(prefill="full", layers=[3], dense_layers=2), "dense_layers"),
    ],
    ids=["unknown-method", "unknown-field", "cache-policy-without-budget", "layer-out-of-range", "negative-dense-layers",
         "layers-and-dense-layers"],
)
def test_bad_arguments_raise_at_patch_time(smollm2, kwargs, match):
    with pytest.raises(ValueError, match=match):
        with ak.patch(smollm2.model, **kwargs):
            pass
    assert smollm2.model.config._attn_implementation == "sdpa"


def test_patch_with_cache_policy_generates_within_budget(smollm2, license_text):
    model, tok = smollm2.model, smollm2.tokenizer
    inputs = tok(smollm2.chat_prompt(license_text[:500] + "\n\nWhich license is this?"), return_tensors="pt")
    assert inputs.input_ids.shape[1] > 64
    # when="both": also compressed while decoding (snapkv's default "prefill" adds decode tokens on top)
    with ak.patch(model, cache="snapkv", budget=64, when="both"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, ak.KVCache) and cache.policy.name == "snapkv" and cache.budget == 64
    assert cache.when == "both"
    text = tok.decode(out.sequences[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert text.strip()
    for i in range(len(cache.layers)):
        assert int((cache.kept_positions(i) >= 0).sum(-1).max()) <= 64
    assert "generate" not in model.__dict__ and model.config._attn_implementation == "sdpa"
    # routing: budget goes to the cache, method fields to the prefill method, cache fields in cache_config
    with ak.patch(model, prefill="streaming", cache="snapkv", budget=64, sink=4, window=16,
                  cache_config={"window": 8}), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values.policy.config.window == 8


@pytest.mark.parametrize(
    "prefill, config",
    [("full", {}), ("streaming", {"sink": 4, "window": 16})],
    ids=["full", "streaming"],
)
def test_padded_batch_generates_like_single_rows(smollm2, prefill, config):
    tok, model = smollm2.tokenizer, smollm2.model
    prompts = [
        smollm2.chat_prompt("What is the capital of France?"),
        smollm2.chat_prompt("Name three colors of the rainbow, please."),
    ]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any(), "the prompts must differ in length"

    def new_text(enc) -> list[str]:
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        return tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)

    with ak.patch(model, prefill=prefill, **config):
        together = new_text(batch)
        alone = [new_text(tok([p], return_tensors="pt"))[0] for p in prompts]
    assert together == alone
    assert all(t.strip() for t in together)


# --- the attention function alone --------------------------------------------------------


def _module(layer_idx: int = 0, spec=None) -> torch.nn.Module:
    module = torch.nn.Module()
    module.layer_idx, module.is_causal = layer_idx, True
    setattr(module, layer_attention.LAYER_ATTR, spec)
    return module


def _qkv(t: int, t_kv: int, b: int = 2):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, 6, t, 16, generator=g)
    k, v = torch.randn(2, b, 2, t_kv, 16, generator=g)
    return q, k, v


@pytest.mark.parametrize("spec", [None, LayerMethod("full")], ids=["exact", "method"])
@pytest.mark.parametrize("t, t_kv", [(1, 9), (7, 7), (5, 12)], ids=["decode", "prefill", "chunk"])
def test_attention_function_unmasked(spec, t, t_kv):
    q, k, v = _qkv(t, t_kv)
    out, weights = patching.attnkit_attention(
        _module(spec=spec), q, k, v, None, scaling=0.3, position_ids=torch.arange(t_kv - t, t_kv)[None]
    )
    assert weights is None and out.shape == (2, t, 6, 16) and out.is_contiguous()
    mask = torch.ones(t, t_kv, dtype=torch.bool).tril(t_kv - t)  # bottom-right causal
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                         attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_empty_static_slots_are_ignored():
    # Prefill into an empty static cache: T_kv > T, no mask, queries start at position 0.
    q, k, v = _qkv(5, 12)
    out, _ = patching.attnkit_attention(_module(), q, k, v, None, position_ids=torch.arange(5)[None])
    ref = F.scaled_dot_product_attention(q, k[:, :, :5].repeat_interleave(3, 1),
                                         v[:, :, :5].repeat_interleave(3, 1), is_causal=True)
    torch.testing.assert_close(out, ref.transpose(1, 2))


def _padding_mask(real: torch.Tensor, t: int, t_kv: int, causal: bool) -> torch.Tensor:
    """transformers' own mask for a 2D padding mask ``real`` (B, T_kv)."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    return sdpa_mask(batch_size=real.shape[0], q_length=t, kv_length=t_kv, q_offset=t_kv - t,
                     mask_function=causal_mask_function if causal else bidirectional_mask_function,
                     attention_mask=real, allow_is_causal_skip=False)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_run_alone(causal, side):
    t = t_kv = 8
    q, k, v = _qkv(t, t_kv)
    real = torch.ones(2, t_kv, dtype=torch.bool)
    pad = slice(0, 3) if side == "left" else slice(5, 8)
    real[1, pad] = False
    mask = _padding_mask(real, t, t_kv, causal)
    assert patching.row_spans(mask, causal, t) == [(0, 8), (3, 8) if side == "left" else (0, 5)]
    module = _module(spec=LayerMethod("full", {}, "exact"))  # the method call (not the exact path): rows run alone
    module.is_causal = causal
    out, _ = patching.attnkit_attention(module, q, k, v, mask)
    keep = real[1]
    alone, _ = patching.attnkit_attention(module, q[1:, :, keep], k[1:, :, keep], v[1:, :, keep], None)
    torch.testing.assert_close(out[1, keep], alone[0])
    if causal:
        assert (out[1, ~keep] == 0).all()  # a padded query of a causal layer sees no key
    else:  # transformers' mask hides padded keys, not queries: padded queries attend as in SDPA
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
        torch.testing.assert_close(out[1, ~keep], ref.transpose(1, 2)[1, ~keep])
    exact, _ = patching.attnkit_attention(_module(), q[:1], k[:1], v[:1], None, is_causal=causal)
    torch.testing.assert_close(out[:1], exact)


def test_other_masks_fall_back_to_exact():
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    t = 10
    q, k, v = _qkv(t, t)
    mask = sdpa_mask(batch_size=2, q_length=t, kv_length=t, mask_function=sliding_window_causal_mask_function(4),
                     allow_is_causal_skip=False)
    assert patching.row_spans(mask, True, t) is None
    out, _ = patching.attnkit_attention(_module(spec=LayerMethod("streaming", {"window": 2})), q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_plan_normalization():
    full, stream = LayerMethod("full"), LayerMethod("streaming", {"window": 8})
    assert patching._normalize("full") == (full, {})
    assert patching._normalize({0: "full", 2: ("streaming", {"window": 8})}) == (None, {0: full, 2: stream})
    assert patching._normalize({"default": "full", "layers": {1: None}}) == (full, {1: None})
    with pytest.raises(ValueError, match="layer indices"):
        patching._normalize({"default": "full", 3: "full"})
    with pytest.raises(TypeError):
        patching._normalize({0: 42})


def test_module_namespace_is_patchable():
    assert isinstance(ak.patch, types.FunctionType)
    assert ak.apply is patching.apply and ak.unpatch is patching.unpatch


def test_encoder_full_matches_unpatched():
    from attnkit import models

    lm = models.load("minilm", progress=False)
    enc = lm.tokenizer(["A short one.", "A somewhat longer sentence with more words in it."],
                       return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()
    with torch.no_grad():
        ref = lm.model(**enc).last_hidden_state
        with ak.patch(lm.model, prefill="full"):
            out = lm.model(**enc).last_hidden_state
    real = enc.attention_mask.bool()
    assert (out[real] - ref[real]).abs().max().item() < 1e-5
    assert lm.model.config._attn_implementation == "sdpa"


def test_patch_without_with_warns_and_changes_nothing(smollm2):
    import gc

    model = smollm2.model
    with pytest.warns(RuntimeWarning, match="without `with`"):
        ak.patch(model, prefill="streaming", window=8)
        gc.collect()
    assert model.config._attn_implementation == "sdpa"
    assert patching.current_plan(model)[0] is None


def test_bad_config_raises_without_entering(smollm2):
    with pytest.raises(ValueError, match="budget"):
        ak.patch(smollm2.model, prefill="full", cache="snapkv")
