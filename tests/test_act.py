"""ACT (attention calibration of hidden sinks) against a dense float64 oracle written from
the paper / reference code: the N x N attention map, the column means over the rows that
see each key, the sinks above the threshold (the first one kept), their mass scaled by
beta and given to the other keys in proportion."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak


def oracle(q, k, v, causal, beta=0.4, threshold=0.1, heads=None):
    q, k, v = (t.double() for t in (q, k, v))
    b, hq, nq, d = q.shape
    g = hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    nk = k.shape[2]
    s = q @ k.transpose(-1, -2) / d ** 0.5
    if causal:
        mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
        s = s.masked_fill(~mask, float("-inf"))
    a = s.softmax(-1)
    out = a @ v
    for bi in range(b):
        for h in range(hq) if heads is None else heads:
            m = a[bi, h]
            seen = (torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq) if causal else torch.ones(nq, nk, dtype=torch.bool))
            means = m.sum(0) / seen.sum(0).clamp(min=1)
            sinks = torch.nonzero(means > threshold).flatten()[1:]
            if len(sinks) == 0:
                continue
            a_s = m[:, sinks].sum(1, keepdim=True)
            new = m.clone()
            new[:, sinks] *= beta
            rest = m.clone()
            rest[:, sinks] = 0
            ratios = rest / rest.sum(1, keepdim=True)
            new = new + a_s * (1 - beta) * ratios
            ok = (a_s[:, 0] < 1 - 1e-6)
            new[~ok] = m[~ok]
            out[bi, h] = new @ v[bi, h]
    return out


def sinky(b=2, hq=4, hkv=2, n=67, d=16, seed=0):
    """Random q/k/v with hidden sinks: a few keys every query attends to strongly."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=gen)
    u = u / u.norm()  # every query leans along u; keys along u get outsized attention
    q = torch.randn(b, hq, n, d, generator=gen) + 3 * u
    k = torch.randn(b, hkv, n, d, generator=gen) * 0.5
    v = torch.randn(b, hkv, n, d, generator=gen)
    for pos, strength in ((0, 2.0), (n // 7, 1.8), (n // 2, 1.6)):
        k[:, :, pos] = strength * d ** 0.5 * u
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 2)])
def test_act_equals_the_dense_oracle(causal, hq, hkv):
    q, k, v = sinky(hq=hq, hkv=hkv, seed=hq + hkv)
    out = ak.attention(q, k, v, method="act", causal=causal)
    ref = oracle(q, k, v, causal)
    assert (out.double() - ref).abs().max() < 1e-5
    plain = ak.attention(q, k, v, method="full", causal=causal)
    assert (out - plain).abs().max() > 1e-3  # the calibration changed something


def test_act_on_chosen_heads_only_and_bottom_right_causal():
    q, k, v = sinky(n=50)
    q = q[:, :, -20:]  # Nq < Nk: causal is bottom-right aligned
    out = ak.attention(q, k, v, method="act", causal=True, heads=[1, 3], beta=0.2, threshold=0.05)
    ref = oracle(q, k, v, True, beta=0.2, threshold=0.05, heads=[1, 3])
    assert (out.double() - ref).abs().max() < 1e-5
    plain = ak.attention(q, k, v, method="full", causal=True)
    assert torch.equal(out[:, [0, 2]], plain[:, [0, 2]])


def test_act_beta_one_is_exact_attention_and_gradients_flow():
    q, k, v = sinky(n=33)
    plain = ak.attention(q, k, v, method="full", causal=True)
    assert torch.allclose(ak.attention(q, k, v, method="act", causal=True, beta=1.0), plain, atol=1e-6)
    q, k, v = sinky(b=1, hq=2, hkv=1, n=14, d=4)
    assert (ak.attention(q, k, v, method="act", causal=True) - ak.attention(q, k, v, causal=True)).abs().max() > 1e-3
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: ak.attention(a, b, c, method="act", causal=True), leaves)


def test_act_errors():
    q, k, v = sinky(n=16)
    with pytest.raises(ValueError, match="beta must be in"):
        ak.attention(q, k, v, method="act", beta=1.5)
    with pytest.raises(ValueError, match="out of range for Hq=4"):
        ak.attention(q, k, v, method="act", heads=[7])
    with pytest.raises(ValueError, match="no log-sum-exp"):
        ak.attention(q, k, v, method="act", return_lse=True)


def test_act_column_means_need_no_square_map(monkeypatch):
    """The column means run in blocks of query rows: a block budget of 64 scores gives the
    same result as one block."""
    from attnkit.methods import act

    q, k, v = sinky(n=40)
    whole = ak.attention(q, k, v, method="act", causal=True)
    monkeypatch.setattr(act, "BLOCK_ELEMENTS", 64)
    assert torch.allclose(ak.attention(q, k, v, method="act", causal=True), whole, atol=1e-6)


def test_act_patches_a_model_and_trains():
    """ak.patch(prefill="act") on a tiny Llama: beta=1 gives the unpatched logits; the
    default calibration runs forward and backward with finite gradients."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    with ak.patch(model, prefill="act", beta=1.0):
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)
    with ak.patch(model, prefill="act", threshold=0.05):
        loss = model(ids, labels=ids).loss
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_docs_example_runs(capsys):
    """The example of docs/analysis.md's ACT section runs as written."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "analysis.md").read_text()
    code = re.findall(r"```python\n(.*?)```", doc.split("## Calibrating hidden sinks")[1], re.S)[0]
    exec(compile(code, "docs/analysis.md", "exec"), {})
    assert "torch.Size([1, 4, 512, 64])" in capsys.readouterr().out
