"""Training through attnkit prefill methods (issue #14): exact gradients inside models.

Every prefill method runs in ``model.train()`` under ``attnkit.patch``: forward and
``loss.backward()`` work, and the gradients equal those of the same model patched with
the same method on ``backend="dense"`` (the same allowed set as one explicit mask) and
those of an oracle that runs the allowed set the method selected through
``reference_attention`` (plain autograd ops, float64), independent of the tiled executor.
The selection of a dynamic method is discrete and computed without gradients in all
three runs, so the runs differ only in how the attention over that set is computed.
"""

from __future__ import annotations

import contextlib
import copy
import pathlib
import re
import types

import pytest
import torch

pytest.importorskip("transformers")

import attnkit as ak  # noqa: E402
from attnkit import api, layer_attention, patching  # noqa: E402
from attnkit.kernels import BACKENDS, DENSE_MAX_ELEMS  # noqa: E402
from attnkit.kernels.backends import as_block_pattern  # noqa: E402
from attnkit.patching import LayerMethod  # noqa: E402
from attnkit.reference import reference_attention  # noqa: E402

ATTENTION = api.attention  # the real one: the spy below replaces api.attention

PREFILL = [m.name for m in ak.methods() if "prefill" in m.kinds and m.family != "linear"]  # softmax methods

T = 1200  # tokens of the tiny model: T*T > DENSE_MAX_ELEMS, so "auto" runs the sparse kernels
HEADS, KV_HEADS = 4, 2

# Small configs: every pattern is sparse at T tokens (asserted below: density < 0.9).
CONFIGS = {
    "full": {},
    "block_local_global": {"block": 64, "window_blocks": 3, "global_tokens": 32, "random_blocks": 2},
    "dilated": {"window": 128, "dilation": 2},
    "neighborhood": {"kernel_size": 129},
    "power": {"block": 64, "window_blocks": 3, "sink_blocks": 1},
    "sliding_window": {"window": 256},
    "streaming": {"sink": 4, "window": 256},
    "block_topk": {"block_size": 64, "topk": 4},
    "flexprefill": {"gamma": 0.5, "block": 128, "min_budget": 128, "max_budget": 256},
    "hip": {"block_size": 64, "topk": 128, "sink": 16, "local": 128},
    "hyper": {"block_size": 64, "sample_size": 64, "min_seq_len": 512, "sink": 16, "local": 128},
    "minference": {"head_patterns": [{"pattern": "a_shape", "sink": 16, "window": 128},
                                     {"pattern": "vertical_slash", "vertical_size": 64, "slash_size": 64},
                                     {"pattern": "block_sparse", "top_k": 4},
                                     {"pattern": "vertical_slash", "vertical_size": 32, "slash_size": 128}]},
    "minference_block": {"top_k": 4},
    "moba": {"block_size": 128, "topk": 3, "sink": 0},
    "pbs": {"block_size": 64, "segment_size": 256, "threshold": 0.5},
    "routing": {"clusters": 4, "block_size": 64, "sink": 16, "local": 128},
    "sea": {"block_size": 64, "topk": 128, "chunk": 8, "features": 16, "sink": 16, "local": 128},
    "vertical_slash": {"vertical_size": 64, "slash_size": 64, "last_q": 64, "sink": 4, "local": 64},
}
# How each prefill method is checked in a causal LM; the rest run a pattern, checked
# against backend="dense" and the oracle.
OWN_CHECK = {
    "full": "exact kernel: against the unpatched model",
    "hyper": "no fixed pattern: finite differences",
    "act": "calibrates the distribution (no pattern): gradcheck and patched training in test_act.py",
    "biformer": "non-causal only: refused by a causal LM, trained in an encoder",
}
PATTERN_METHODS = [name for name in PREFILL if name not in OWN_CHECK]


def test_every_prefill_method_has_a_training_check():
    assert T * T > DENSE_MAX_ELEMS  # else "auto" would run every pattern as the dense mask
    assert set(OWN_CHECK) <= set(PREFILL)
    missing = set(PATTERN_METHODS) - set(CONFIGS)
    assert not missing, f"add a small config for {sorted(missing)} to CONFIGS"


# --- helpers -------------------------------------------------------------------------


def _rms_norm_in_input_dtype(self, x):
    """LlamaRMSNorm.forward without its cast to float32, which would round a float64
    model to float32 precision at every norm (and make finite differences useless)."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.fixture(scope="module")
def tiny():
    """A randomly initialised 2-layer Llama (GQA: 4 query / 2 KV heads, head dim 16) in float64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
                         initializer_range=0.1, attention_dropout=0.0)
    model = LlamaForCausalLM(config).double().train()
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def calls(monkeypatch):
    """Every ``attnkit.attention`` call a patched model makes: (backend asked, AttentionStats)."""
    seen = []

    def spy(*args, **kwargs):
        out, stats = ATTENTION(*args, return_stats=True, **kwargs)
        seen.append((kwargs["backend"], stats))
        return out

    monkeypatch.setattr(api, "attention", spy)
    return seen


def oracle_method(spec, q, k, v, causal, scale, window=None, softcap=None):
    """``layer_attention.run_method`` with the oracle: the allowed set the method selects (its
    ``stats.pattern``, chosen without gradients) as an explicit mask over
    ``reference_attention`` (autograd through plain ops, float64)."""
    with torch.no_grad():
        _, stats = ATTENTION(q, k, v, method=spec.name, causal=causal, scale=scale, return_stats=True, **spec.config)
    mask = as_block_pattern(stats.pattern, q.shape[1]).dense_mask(q.shape[0], q.shape[1])
    return reference_attention(q, k, v, mask=mask, causal=causal, scale=scale).to(q.dtype)


def lm_loss(model, ids, attention_mask=None, labels=None):
    """(logits, next-token cross-entropy) in the model's dtype (transformers' own loss
    casts the logits to float32, too coarse for finite differences in float64)."""
    logits = model(ids, attention_mask=attention_mask).logits
    labels = ids if labels is None else labels
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return logits, loss


def q_proj_grads(model, ids, attention_mask=None, labels=None, oracle=False, **patch_kw):
    """(logits, loss, [q_proj.weight.grad per layer]) of one training step's backward,
    under ``attnkit.patch(model, **patch_kw)`` (unpatched without patch_kw)."""
    model.zero_grad(set_to_none=True)
    with pytest.MonkeyPatch.context() as mp:
        if oracle:
            mp.setattr(layer_attention, "run_method", oracle_method)
        with ak.patch(model, **patch_kw) if patch_kw else contextlib.nullcontext():
            logits, loss = lm_loss(model, ids, attention_mask, labels)
            loss.backward()
    grads = [layer.self_attn.q_proj.weight.grad.clone() for layer in model.model.layers]
    model.zero_grad(set_to_none=True)
    return logits.detach(), loss.detach(), grads


RTOL64 = 1e-9  # float64 gradients: measured ~2e-15 (relative norm), for every method


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def assert_grads_equal(got, want, rtol):
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all(), f"layer {i}: non-finite q_proj gradient"
        assert w.norm() > 0, f"layer {i}: zero q_proj gradient"
        assert rel(g, w) < rtol, f"layer {i}: q_proj gradients differ by {rel(g, w):.3g} (relative norm)"
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * w.abs().max().item())


# --- every prefill method, tiny Llama, float64 ---------------------------------------


@pytest.mark.parametrize("name", PATTERN_METHODS)
def test_gradients_equal_dense_backend_and_oracle(tiny, ids, calls, name):
    config = CONFIGS[name]
    logits, loss, grads = q_proj_grads(tiny, ids, prefill=name, **config)
    auto_calls = list(calls)
    calls.clear()
    logits_d, _, grads_d = q_proj_grads(tiny, ids, prefill=name, backend="dense", **config)
    dense_calls = list(calls)
    logits_o, _, grads_o = q_proj_grads(tiny, ids, oracle=True, prefill=name, **config)

    # one call per layer; auto ran sparse kernels on a sparse pattern, the forced run the dense mask
    assert [b for b, _ in auto_calls] == ["auto"] * 2 and [b for b, _ in dense_calls] == ["dense"] * 2
    assert all("dense" not in s.backend.split("+") and s.density < 0.9 for _, s in auto_calls), \
        [(s.backend, s.density) for _, s in auto_calls]
    assert all(set(s.backend.split("+")) == {"dense"} for _, s in dense_calls)
    assert torch.isfinite(loss)
    torch.testing.assert_close(logits, logits_d, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(logits, logits_o, rtol=1e-9, atol=1e-12)
    assert_grads_equal(grads, grads_d, rtol=RTOL64)
    assert_grads_equal(grads, grads_o, rtol=RTOL64)


def test_full_equals_the_unpatched_model(tiny, ids, calls):
    logits, _, grads = q_proj_grads(tiny, ids, prefill="full")
    assert calls == []  # "full" is exact attention: the layer's exact path (torch's fused SDPA), no method call
    logits_ref, _, grads_ref = q_proj_grads(tiny, ids)  # transformers' own SDPA attention
    torch.testing.assert_close(logits, logits_ref, rtol=1e-9, atol=1e-12)
    assert_grads_equal(grads, grads_ref, rtol=RTOL64)


def test_hyper_gradient_matches_finite_differences(tiny, ids, calls):
    """HyperAttention has no fixed pattern (LSH chunks + a weighted key sample): its
    gradient is that of the estimate as computed. Check it by central differences along
    the gradient and a random direction in each layer's q_proj weight (float64). The loss
    is piecewise smooth (a query that changes LSH bucket changes its chunk), so a step
    may cross a jump: the check passes when one of two step sizes agrees."""
    config = CONFIGS["hyper"]
    _, loss, grads = q_proj_grads(tiny, ids, prefill="hyper", **config)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() and g.norm() > 0 for g in grads)
    assert {s.backend for _, s in calls} == {"hyper"} and all(s.density < 0.9 for _, s in calls)
    for layer, g in zip(tiny.model.layers, grads):
        weight = layer.self_attn.q_proj.weight
        noise = torch.randn(g.shape, dtype=g.dtype, generator=torch.Generator().manual_seed(3))
        for direction in (g / g.norm(), noise / noise.norm()):
            analytic = (g * direction).sum().item()
            errors = []
            for eps in (1e-5, 1e-6):
                losses = []
                for sign in (1, -1):
                    with torch.no_grad():
                        weight.add_(sign * eps * direction)
                        try:
                            with ak.patch(tiny, prefill="hyper", **config):
                                losses.append(lm_loss(tiny, ids)[1].item())
                        finally:
                            weight.sub_(sign * eps * direction)
                errors.append(abs((losses[0] - losses[1]) / (2 * eps) - analytic) / g.norm().item())
            assert min(errors) < 1e-6, errors


def test_biformer_is_refused_by_a_causal_lm(tiny, ids):
    with ak.patch(tiny, prefill="biformer"):
        with pytest.raises(ValueError, match=r"'biformer' does not support causal=True"):
            tiny(ids, labels=ids)


def test_biformer_trains_in_an_encoder(calls):
    """BiFormer is non-causal (a 2D token grid): a tiny BERT encoder over a 35 x 35 grid."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
                        intermediate_size=128, max_position_embeddings=35 * 35, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.1)
    model = BertModel(config, add_pooling_layer=False).double().train()
    tokens = torch.randint(0, 128, (1, 35 * 35), generator=torch.Generator().manual_seed(1))
    target = torch.randn(1, 35 * 35, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def grads(oracle=False, **kw):
        model.zero_grad(set_to_none=True)
        with pytest.MonkeyPatch.context() as mp:
            if oracle:
                mp.setattr(layer_attention, "run_method", oracle_method)
            with ak.patch(model, prefill="biformer", regions=(5, 5), topk=4, **kw):
                hidden = model(tokens).last_hidden_state
                (hidden * target).sum().backward()  # not hidden.pow(2): LayerNorm makes that constant
        return [layer.attention.self.query.weight.grad.clone() for layer in model.encoder.layer]

    auto = grads()
    assert all(s.backend != "dense" and s.density < 0.5 for _, s in calls)
    assert_grads_equal(auto, grads(backend="dense"), rtol=RTOL64)
    assert_grads_equal(auto, grads(oracle=True), rtol=RTOL64)


# --- the old bug, float32: streaming and moba ------------------------------------------


@pytest.mark.parametrize("name", ["streaming", "moba"])
def test_float32_q_proj_gradients_equal_dense_backend(tiny, ids, name):
    """Before the kernel rewrite the patched model's q_proj gradient under streaming
    differed from the dense-forced run by ~3.8%; now it agrees to float32 rounding, and
    both agree with the float64 oracle."""
    model = copy.deepcopy(tiny).float()
    config = CONFIGS[name]
    _, _, auto = q_proj_grads(model, ids, prefill=name, **config)
    _, _, dense = q_proj_grads(model, ids, prefill=name, backend="dense", **config)
    _, _, oracle = q_proj_grads(model, ids, oracle=True, prefill=name, **config)
    for a, d, o in zip(auto, dense, oracle):
        assert rel(a, d) < 1e-5 and rel(a, o) < 1e-5, (rel(a, d), rel(a, o))


def test_padded_batch_gradients(tiny, calls):
    """Left padding: each row runs the method on its own tokens, also backward."""
    tokens = torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :150] = 0
    labels = tokens.masked_fill(mask == 0, -100)
    config = CONFIGS["moba"]
    logits, _, auto = q_proj_grads(tiny, tokens, attention_mask=mask, labels=labels, prefill="moba", **config)
    assert len(calls) == 4 and all(s.backend != "dense" for _, s in calls)  # one call per row and layer
    logits_d, _, dense = q_proj_grads(tiny, tokens, attention_mask=mask, labels=labels, prefill="moba", backend="dense",
                                      **config)
    _, _, oracle = q_proj_grads(tiny, tokens, attention_mask=mask, labels=labels, oracle=True, prefill="moba", **config)
    real = mask.bool()
    torch.testing.assert_close(logits[real], logits_d[real], rtol=1e-9, atol=1e-12)
    assert_grads_equal(auto, dense, rtol=RTOL64)
    assert_grads_equal(auto, oracle, rtol=RTOL64)


# --- backend= and dropout in patch / apply -----------------------------------------------


def test_backend_is_validated_at_patch_time(tiny):
    with pytest.raises(ValueError, match="unknown backend 'nope'") as info:
        with ak.patch(tiny, prefill="streaming", backend="nope"):
            pass
    assert all(name in str(info.value) for name in BACKENDS)
    with pytest.raises(ValueError, match="unknown backend"):
        ak.apply(tiny, {0: ("moba", {"topk": 3, "backend": "nope"})})
    with pytest.raises(ValueError, match="without prefill"):
        with ak.patch(tiny, backend="dense"):
            pass
    assert tiny.config._attn_implementation == "sdpa"
    assert all(m is None for m in patching.current_plan(tiny).values())


def test_apply_plan_carries_the_backend(tiny, ids, calls):
    ak.apply(tiny, {0: ("moba", {"topk": 3, "backend": "dense"}), 1: LayerMethod("streaming", {"window": 256}, "gather")})
    try:
        plan = patching.current_plan(tiny)
        assert plan[0] == LayerMethod("moba", {"topk": 3}, "dense")
        assert plan[1] == LayerMethod("streaming", {"window": 256}, "gather")
        with torch.no_grad():
            tiny(ids[:, :300])
    finally:
        ak.unpatch(tiny)
    assert [(b, s.method, s.backend) for b, s in calls] == [("dense", "moba", "dense"), ("gather", "streaming", "gather")]
    with ak.patch(tiny, prefill="streaming", backend="ranges", window=256):
        assert patching.current_plan(tiny)[1] == LayerMethod("streaming", {"window": 256}, "ranges")


def test_forced_backend_that_cannot_run_raises_at_the_call(tiny, ids):
    with ak.patch(tiny, prefill="streaming", backend="vertical_slash", window=256):
        with pytest.raises(ValueError, match="backend 'vertical_slash' cannot run method 'streaming'.*Compatible backends"):
            tiny(ids[:, :300])


def test_attention_dropout_is_refused_with_an_accurate_message(tiny, ids):
    attn = tiny.model.layers[0].self_attn
    attn.attention_dropout = 0.1
    try:
        with ak.patch(tiny, prefill="streaming", window=256):
            with pytest.raises(ValueError, match="do not implement attention dropout.*attention_dropout to 0"):
                tiny(ids[:, :300], labels=ids[:, :300])
            tiny.eval()  # no dropout in eval mode: runs
            with torch.no_grad():
                assert torch.isfinite(tiny(ids[:, :300]).logits).all()
    finally:
        attn.attention_dropout = 0.0
        tiny.train()


# --- the real model: SmolLM2-135M, float32, 2048 tokens of real text --------------------

# moba and streaming on three layers, the others exact: one plan, so that a training step
# with the sparse kernels and one with backend="dense" (two full forward and backward
# passes at 2048 tokens) cover both methods within the test's time.
SMOL_PLAN = {0: ("moba", {"block_size": 128, "topk": 4}), 15: ("streaming", {"sink": 4, "window": 256}),
             29: ("moba", {"block_size": 128, "topk": 4})}


@pytest.fixture(scope="module")
def smol_ids(smollm2, license_text):
    out = smollm2.tokenizer(license_text, return_tensors="pt").input_ids[:, :2048]
    assert out.shape[1] == 2048
    return out


@contextlib.contextmanager
def training_q_proj(model, layers):
    """Train mode with only the q_proj weights of ``layers`` requiring gradients (the
    shared session model is put back: eval mode, requires_grad, no .grad)."""
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    weights = [model.model.layers[i].self_attn.q_proj.weight for i in layers]
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        model.train()
        yield weights
    finally:
        model.eval()
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
            p.grad = None


def test_smollm2_q_proj_gradients_equal_dense_backend(smollm2, smol_ids, calls):
    """SmolLM2-135M in train mode, float32, 2048 tokens of the GPL-3: the q_proj gradients
    of layers 0, 15 and 29 (moba, streaming, moba) equal those of the same plan with
    ``"backend": "dense"`` within float32 rounding."""
    model = smollm2.model
    grads, losses = {}, {}
    with training_q_proj(model, sorted(SMOL_PLAN)) as weights:
        for backend in ("auto", "dense"):
            ak.apply(model, {i: (name, {**config, "backend": backend}) for i, (name, config) in SMOL_PLAN.items()})
            try:
                loss = model(smol_ids, labels=smol_ids).loss
                loss.backward()
            finally:
                ak.unpatch(model)
            grads[backend] = [w.grad.clone() for w in weights]
            losses[backend] = loss.item()
            for w in weights:
                w.grad = None
    assert 1.0 < losses["auto"] < 5.0 and abs(losses["auto"] - losses["dense"]) < 1e-4
    assert [(b, s.method) for b, s in calls] == [(b, n) for b in ("auto", "dense") for n, _ in SMOL_PLAN.values()]
    assert all(s.backend != "dense" and s.density < 0.5 for b, s in calls if b == "auto")
    assert all(set(s.backend.split("+")) == {"dense"} for b, s in calls if b == "dense")
    for layer, a, d in zip(sorted(SMOL_PLAN), grads["auto"], grads["dense"]):
        assert torch.isfinite(a).all() and d.norm() > 0
        assert rel(a, d) < 1e-3, f"layer {layer}: relative error {rel(a, d):.3g}"


# --- docs/training.md's example, executed as written -------------------------------------


def test_docs_training_example_runs(capsys, license_text):
    """docs/training.md's Python blocks, run as written but for the fine-tuning example's
    size constants (2 steps of 512 tokens instead of 3 of 1024, to keep the test short):
    it fine-tunes SmolLM2 with moba and with streaming and prints the loss per step."""
    page = (pathlib.Path(__file__).parent.parent / "docs" / "training.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    edited = [re.subn(r"^STEPS, TOKENS = 3, 1024\b", "STEPS, TOKENS = 2, 512", code, flags=re.M) for code in blocks]
    assert sum(n for _, n in edited) == 1, "the example's size constants line changed: update this test"
    for i, (code, _) in enumerate(edited):
        exec(compile(code, f"docs/training.md (python block {i + 1})", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    for method in ("moba", "streaming"):
        losses = [float(x) for x in re.findall(rf"^{method} step \d+ loss ([0-9.]+)$", printed, re.M)]
        assert len(losses) == 2 and all(0 < x < 10 for x in losses), printed
        assert losses[1] < losses[0], f"{method}: the loss did not decrease: {losses}"
