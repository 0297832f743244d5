"""KVCache on the real model (SmolLM2-135M): exactness when nothing is evicted, kvpress's
SnapKV selection, and decoding with every policy."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import attnkit as ak
from attnkit.kvcache import KVCache

# Token-dropping policies from the first batch; the others decode on SmolLM2 together in
# test_decoding_smollm2_with_new_policies below (one short run for all, to keep CI fast).
POLICIES = ["streaming", "snapkv", "pyramidkv", "adakv", "h2o", "a2sf", "tova", "knorm", "keydiff", "random"]
BUDGET = 48


@pytest.fixture(scope="module")
def prompt(smollm2, license_text):
    text = license_text[:600]
    return smollm2.chat_prompt(text + "\n\nWhich license is this text from? Answer in one sentence.")


def _generate(lm, inputs, cache=None, new=8):
    kwargs = dict(max_new_tokens=new, do_sample=False, output_scores=True, return_dict_in_generate=True)
    if cache is not None:
        kwargs["past_key_values"] = cache
    with ak.patch(lm.model), torch.no_grad():
        return lm.model.generate(**inputs, **kwargs)


def test_unbounded_cache_equals_default_cache(smollm2, prompt):
    tok = smollm2.tokenizer
    inputs = tok([prompt, "Write one short sentence about the sea."], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = smollm2.model.generate(**inputs, max_new_tokens=10, do_sample=False)
    out = _generate(smollm2, inputs, KVCache("snapkv", budget=10**6), new=10)
    assert torch.equal(out.sequences, ref)


def test_cache_needs_attnkit_attention(smollm2):
    inputs = smollm2.tokenizer("Hello there, how are", return_tensors="pt")
    with torch.no_grad(), pytest.raises(RuntimeError, match="attnkit.patch"):
        smollm2.model.generate(**inputs, max_new_tokens=3, do_sample=False,
                               past_key_values=KVCache("snapkv", budget=4, window=2))


def _import_kvpress():
    # kvpress 0.5.5 imports `datasets` and `fire` at package import for presses we do not
    # use; stub them so that its SnapKVPress scoring code can be imported and called.
    for name in ("datasets", "fire"):
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                stub = types.ModuleType(name)
                stub.load_dataset = stub.Fire = None
                sys.modules[name] = stub
    return pytest.importorskip("kvpress")


def test_snapkv_selects_what_kvpress_selects(smollm2, prompt):
    kvpress = _import_kvpress()
    from kvpress.utils import compute_n_kept

    model, tok = smollm2.model, smollm2.tokenizer
    ids = tok(prompt, return_tensors="pt").input_ids
    captured = {}

    def grab(module, args, kwargs):
        captured[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    hooks = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            full = model(ids, use_cache=True).past_key_values
    finally:
        for h in hooks:
            h.remove()
    ratio = 0.75
    cache = KVCache("snapkv", ratio=ratio, window=32, kernel=5, pooling="avg")  # keeps 43 >= its window
    with ak.patch(model), torch.no_grad():
        model(ids, past_key_values=cache)
    press = kvpress.SnapKVPress(compression_ratio=ratio, window_size=32, kernel_size=5)
    mismatched = []
    for i, layer in enumerate(model.model.layers):
        keys, values = full.layers[i].keys, full.layers[i].values
        hidden, pe = captured[i]
        with torch.no_grad():
            scores = press.score(layer.self_attn, hidden, keys, values, None, {"position_embeddings": pe})
        want = scores.topk(compute_n_kept(keys.shape[2], ratio), dim=-1).indices.sort(-1).values
        if not torch.equal(cache.kept_positions(i), want):
            mismatched.append(i)
    assert not mismatched, f"layers whose kept positions differ from kvpress: {mismatched}"


@pytest.mark.parametrize("policy", POLICIES)
def test_decoding_with_each_policy(smollm2, prompt, policy):
    tok = smollm2.tokenizer
    inputs = tok(prompt, return_tensors="pt")
    cache = KVCache(policy, budget=BUDGET, when="both")
    out = _generate(smollm2, inputs, cache, new=6)
    assert all(bool(torch.isfinite(s[:, s[0] > float("-inf")]).all()) for s in out.scores)
    text = tok.decode(out.sequences[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0
    for i in range(len(cache.layers)):
        per_head = (cache.kept_positions(i) >= 0).sum(-1)
        if policy == "adakv":  # per-head budgets: the layer's total is bounded
            assert int(per_head.sum(-1).max()) <= BUDGET * per_head.shape[1]
        elif policy == "pyramidkv":
            assert int(per_head.max()) <= cache.budget_for(cache.layers[i])
        else:
            assert int(per_head.max()) <= BUDGET
    if policy in ("snapkv", "pyramidkv", "adakv", "h2o", "tova", "a2sf", "streaming"):
        print(policy, repr(text))


def test_generate_with_cache_injects_a_kvcache(smollm2):
    from attnkit.kvcache import generate_with_cache

    inputs = smollm2.tokenizer("The sea is", return_tensors="pt")
    with ak.patch(smollm2.model), generate_with_cache(smollm2.model, "streaming", budget=8), torch.no_grad():
        out = smollm2.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, KVCache)
    assert "generate" not in smollm2.model.__dict__
    with pytest.raises(ValueError, match="budget"):
        with generate_with_cache(smollm2.model, "snapkv"):
            pass


# Policies with their own storage (no eviction, no budget): ThinK prunes the prompt's key
# channels, ZipCache quantizes at mixed precision; KIVI (`quantized`) decodes in
# test_decoding_smollm2_with_new_policies's shared run. A left-padded batch of two prompts.
STORAGE = {"think": 0.9, "zipcache": 0.25}  # bytes held / bytes of a full cache must stay below


@pytest.mark.parametrize("policy", sorted(STORAGE))
def test_decoding_with_storage_policy(smollm2, prompt, policy):
    tok = smollm2.tokenizer
    sea = smollm2.chat_prompt("Write one short sentence about the sea.")
    inputs = tok([prompt, sea], return_tensors="pt", padding=True)
    cache = KVCache(policy)
    out = _generate(smollm2, inputs, cache, new=6)
    assert all(bool(torch.isfinite(s[:, s[0] > float("-inf")]).all()) for s in out.scores)
    n = inputs.input_ids.shape[1]
    texts = tok.batch_decode(out.sequences[:, n:], skip_special_tokens=True)
    assert all(t.strip() for t in texts), texts
    real = inputs.attention_mask.sum(-1) + 5  # every real token is kept (the 6th new one is not fed back)
    for i in range(len(cache.layers)):
        assert torch.equal((cache.kept_positions(i) >= 0).sum(-1), real[:, None].expand(-1, 3))
    ratio = cache.nbytes() / cache.full_nbytes()
    assert ratio < STORAGE[policy], ratio
    print(policy, f"bytes {cache.nbytes()} / full {cache.full_nbytes()} = {ratio:.3f}", texts)


def test_think_without_pruning_equals_default_cache(smollm2, prompt):
    # the storage hook on the real model: a store that prunes nothing changes nothing
    tok = smollm2.tokenizer
    inputs = tok([prompt, "Write one short sentence about the sea."], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = smollm2.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    out = _generate(smollm2, inputs, KVCache("think", pruning_ratio=0.0), new=6)
    assert torch.equal(out.sequences, ref)


# --- on the real model: one short decode with each new policy -------------------------------

NEW = [("quantized", dict(bits=4, group_size=32, residual=32)), ("quest", dict(budget=32, page_size=8)),
       ("expected_attention", dict(budget=48)), ("chunkkv", dict(budget=48)), ("scissorhands", dict(budget=48)),
       ("duo", dict(budget=48)), ("compose", dict(budget=48, prefill="snapkv", decode="tova")),
       # query-aware selection: every token kept, 48 attended per decode step
       ("tokenselect", dict(budget=48)), ("recycled", dict(budget=48, stride=2)), ("retrieval", dict(budget=48)),
       ("infllm", dict(budget=48))]
QUERY_AWARE = ("quantized", "quest", "tokenselect", "recycled", "retrieval", "infllm")


def test_decoding_smollm2_with_new_policies(smollm2, license_text):
    tok, model = smollm2.tokenizer, smollm2.model
    prompt = smollm2.chat_prompt(license_text[:300] + "\n\nWhich license is this text from?")
    inputs = tok(prompt, return_tensors="pt")
    n = inputs.input_ids.shape[1]
    texts = {}
    for policy, kw in NEW:
        cache = KVCache(policy, **kw)
        with ak.patch(model), torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, past_key_values=cache)
        assert all(bool(torch.isfinite(s[:, s[0] > float("-inf")]).all()) for s in out.scores), policy
        texts[policy] = tok.decode(out.sequences[0, n:], skip_special_tokens=True)
        assert texts[policy].strip(), policy
        kept = [int((cache.kept_positions(i) >= 0).sum(-1).max()) for i in range(len(cache.layers))]
        if policy in QUERY_AWARE:
            assert kept == [n + 2] * len(kept)  # full cache kept
        elif policy == "duo":  # retrieval heads full, streaming heads within the budget
            per_head = torch.stack([(cache.kept_positions(i) >= 0).sum(-1)[0] for i in range(len(cache.layers))])
            assert int(per_head.max()) == n + 2 and int(per_head.min()) <= 48
        else:
            assert max(kept) <= 48 + 2, (policy, kept)  # default when="prefill" adds decode tokens on top
    assert cache_bytes_saving(model, inputs)
    print(texts)


def cache_bytes_saving(model, inputs):
    cache = KVCache("quantized", bits=2, group_size=32, residual=32)
    with ak.patch(model), torch.no_grad():
        model(**inputs, past_key_values=cache)
    return cache.nbytes() * 3 < cache.full_nbytes()
