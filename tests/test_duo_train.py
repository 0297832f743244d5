"""DuoAttention's gate optimisation (attnkit.analysis.duo_train) against independent references:
the dense float64 oracle (attnkit.reference) with an explicit sinks + recent mask, the
model's own attention and attnkit's ``streaming`` prefill, finite differences."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import attnkit as ak  # noqa: E402
from attnkit.analysis import duo_train as dt  # noqa: E402
from attnkit.methods.kvcache.duo import load_plan  # noqa: E402
from attnkit.reference import reference_attention  # noqa: E402

SINK, RECENT = 4, 16


def tiny(layers: int = 2, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.1, attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).to(dtype).eval()


def sample(n: int = 64, supervised: int = 12, seed: int = 1):
    ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))
    sup = torch.zeros_like(ids, dtype=torch.bool)
    sup[:, -supervised:] = True
    return ids, sup


def streaming_mask(n: int, sink: int, recent: int) -> torch.Tensor:
    """(N, N) bool written from StreamingLLM's rule: key j < sink or i - recent < j <= i."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j <= i) & ((j < sink) | (j > i - recent))


def test_gated_attention_matches_the_float64_oracle():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 40, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 40, 16, dtype=torch.float64) for _ in range(2))
    full = reference_attention(q, k, v, causal=True)
    stream = reference_attention(q, k, v, mask=streaming_mask(40, SINK, RECENT), causal=True)
    torch.testing.assert_close(dt.gated_attention(q, k, v, torch.ones(2), SINK, RECENT), full)
    torch.testing.assert_close(dt.gated_attention(q, k, v, torch.zeros(2), SINK, RECENT), stream)
    alpha = torch.tensor([0.3, 0.8], dtype=torch.float64)
    a = alpha.repeat_interleave(2).view(1, 4, 1, 1)  # query heads 0, 1 -> KV head 0; 2, 3 -> 1
    torch.testing.assert_close(dt.gated_attention(q, k, v, alpha, SINK, RECENT), a * full + (1 - a) * stream)
    with pytest.raises(ValueError, match="one gate per KV head"):
        dt.gated_attention(q, k, v, torch.ones(4), SINK, RECENT)


def test_gated_model_alpha_one_is_the_model_and_alpha_zero_is_streaming():
    model = tiny()
    ids, _ = sample(80)
    with torch.no_grad():
        own = model.model(ids).last_hidden_state  # transformers' own attention
        with dt.gated(model, torch.ones(2, 2), SINK, RECENT):
            ones = dt.final_hidden(model, ids)
        with dt.gated(model, torch.zeros(2, 2), SINK, RECENT):
            zeros = dt.final_hidden(model, ids)
        with ak.patch(model, prefill="streaming", sink=SINK, window=RECENT):
            streaming = model.model(ids).last_hidden_state
    torch.testing.assert_close(ones, own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zeros, streaming, atol=1e-5, rtol=1e-5)
    assert (ones - zeros).abs().max() > 1e-3  # the two differ: the test can tell them apart
    assert model.config._attn_implementation != dt.GATED_FN  # restored
    assert not any(hasattr(m, dt.GATE_ATTR) for m in model.modules())


def test_loss_gradient_matches_finite_differences():
    model = tiny(dtype=torch.float64)
    ids, sup = sample(48, 8)
    target = dt.full_hidden(model, ids, sup).double()
    gates = torch.tensor([[0.3, 0.7], [0.6, 0.2]], dtype=torch.float64, requires_grad=True)

    def loss(g):
        return dt.duo_loss(model, g, ids, sup, target, SINK, RECENT, reg=0.05)[0]

    # Llama's RMSNorm and rotary embedding compute in float32 even in a float64 model: the
    # loss carries ~1e-8 rounding noise, so the central differences use eps 1e-3 (their
    # truncation error, O(eps^2), and the noise / eps both stay below atol)
    assert torch.autograd.gradcheck(loss, (gates,), eps=1e-3, atol=1e-4, rtol=1e-3)
    assert all(p.grad is None for p in model.parameters())


def test_training_reduces_the_loss_and_leaves_the_weights_alone():
    model = tiny()
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history: list = []
    ids, sup = sample(64, 12)
    gates = ak.analysis.train_duo_gates(model, lambda step: (ids, sup), steps=8, sink=SINK, recent=RECENT,
                                        lr=0.05, init=0.5, progress=False, history=history)
    assert gates.shape == (2, 2) and gates.dtype == torch.float32
    assert bool(((gates >= 0) & (gates <= 1)).all())
    assert len(history) == 8 and history[-1]["loss"] < history[0]["loss"]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert not model.training and model.config._attn_implementation != dt.GATED_FN


def test_global_selection_and_plans_load_into_the_duo_cache(tmp_path):
    gates = torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.95, 0.8], [0.4, 0.05, 0.85], [0.0, 0.0, 0.0]])
    # 25% of 12 KV heads = 3, the highest over all layers (not one per layer)
    assert dt.duo_plan(gates, retrieval_share=0.25) == {0: [0, 0, 0], 1: [1, 1, 0], 2: [0, 0, 1], 3: [0, 0, 0]}
    assert dt.duo_plan(gates, threshold=0.5) == {0: [0, 0, 0], 1: [1, 1, 1], 2: [0, 0, 1], 3: [0, 0, 0]}
    assert sum(map(sum, dt.duo_plan(gates).values())) == 3  # default share 0.25
    assert sum(map(sum, dt.duo_plan(torch.ones(4, 3), retrieval_share=0.5).values())) == 6  # ties: lower first
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(dt.duo_plan(gates)))
    assert load_plan(str(path)) == dt.duo_plan(gates)

    model = tiny()
    ids, sup = sample(64, 12)
    trained = ak.analysis.train_duo_gates(model, lambda step: (ids, sup), steps=2, sink=SINK, recent=RECENT,
                                          progress=False)
    plan = ak.analysis.duo_plan(trained, retrieval_share=0.5)
    json_plan = json.loads(json.dumps(plan))  # string keys, as read back from a file
    cache = ak.KVCache("duo", plan=json_plan, budget=16, sink=SINK)
    with torch.no_grad(), ak.patch(model):
        out = model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 67)
    roles = {layer: r.tolist() for layer, r in cache.policy.roles.items()}
    assert roles == {layer: [bool(x) for x in row] for layer, row in plan.items()}  # the plan's roles were used

    head_plan = ak.analysis.duo_head_plan(trained, retrieval_share=0.5, budget=16, query_heads=4)
    assert head_plan.counts()["retrieval"] == 2
    assert head_plan.cache_args()["plan"] == {int(k): v for k, v in plan.items()}
    head_plan = ak.Plan.from_json(head_plan.to_json(), model=model)
    ak.apply(model, head_plan)
    try:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, do_sample=False)
    finally:
        ak.unpatch(model)


def test_bad_input_is_refused_with_a_reason():
    model = tiny()
    data = lambda step: sample()  # noqa: E731
    for kwargs, needle in (({"steps": 0}, "steps must be"), ({"steps": 2.5}, "steps must be"),
                           ({"sink": 0}, "sink must be"), ({"recent": -1}, "recent must be"),
                           ({"lr": 0.0}, "bad lr"), ({"init": 1.5}, "bad init")):
        with pytest.raises(ValueError, match=needle):
            ak.analysis.train_duo_gates(model, data, progress=False, **kwargs)
    with pytest.raises(ValueError, match="transformers model"):
        ak.analysis.train_duo_gates(torch.nn.Linear(2, 2), data, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        ak.analysis.train_duo_gates(model, 42, steps=1, progress=False)
    with pytest.raises(ValueError, match="no supervised position"):
        ak.analysis.train_duo_gates(model, lambda s: (sample()[0], torch.zeros(1, 64, dtype=torch.bool)),
                                    steps=1, progress=False)
    with pytest.raises(ValueError, match="expected shape"):
        with dt.gated(model, torch.ones(3, 2)):
            pass
    gates = torch.rand(2, 2)
    for kwargs, needle in (({"retrieval_share": 1.5}, "retrieval_share must be"),
                           ({"retrieval_share": 0.5, "threshold": 0.5}, "not both"),
                           ({"threshold": 2.0}, "threshold must be")):
        with pytest.raises(ValueError, match=needle):
            dt.duo_plan(gates, **kwargs)
    with pytest.raises(ValueError, match="layers, KV heads"):
        dt.duo_plan(torch.rand(4))


class CharTokenizer:
    """One token per character (enough for the prompt builder)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, **kwargs):
        return "".join(chr(i) for i in ids)


def test_passkey_sample_asks_back_every_passkey():
    tok = CharTokenizer()
    ids, sup = dt.passkey_sample(tok, length=3000, seed=3, passkeys=3, words=4, haystack="noise")
    text = tok.decode(ids[0].tolist())
    asked = tok.decode(ids[0][sup[0]].tolist())
    context = tok.decode(ids[0][~sup[0]].tolist())
    assert abs(ids.shape[1] - 3000) < 200 and context + asked == text
    assert asked.startswith("Based on the content of the book, what is the first passkey")
    keys = [line.split(": ", 1)[1] for line in asked.splitlines() if line.startswith("Passkey: ")]
    assert len(keys) == 3 and all(len(k.split()) == 4 for k in keys)
    positions = [context.index(f"passkey to the vault: {k}.") for k in keys]
    assert positions == sorted(positions) and context.endswith("</book>.\n\n")
    assert torch.equal(dt.passkey_sample(tok, 3000, 3, 3, 4, "noise")[0], ids)  # seeded
    with pytest.raises(ValueError, match="raise length"):
        dt.passkey_sample(tok, length=200, passkeys=3)


def test_cli_dry_run_and_bad_options(tmp_path):
    from typer.testing import CliRunner

    from attnkit.cli import app

    runner = CliRunner()
    out = tmp_path / "duo.json"
    res = runner.invoke(app, ["duo-gates", "--steps", "5", "--length", "2k", "--out", str(out), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "steps: 5 passkey prompts of 2048 tokens" in res.output
    assert f"would write: {out}, {tmp_path / 'duo.gates.json'}" in res.output and not out.exists()
    for args, needle in ((["--steps", "0"], "steps"), (["--retrieval-share", "1.5"], "retrieval-share"),
                         (["--haystack", "nope"], "haystack"), (["--threshold", "-1"], "threshold")):
        res = runner.invoke(app, ["duo-gates", *args, "--dry-run"])
        assert res.exit_code == 2 and needle in res.output, res.output


def test_docs_example_runs(capsys):
    """The first example of docs/analysis.md's "DuoAttention's optimisation" runs as written."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "analysis.md").read_text()
    code = re.findall(r"```python\n(.*?)```", doc.split("## DuoAttention's optimisation")[1], re.S)[0]
    exec(compile(code, "docs/analysis.md", "exec"), {})
    assert "torch.Size([2, 2])" in capsys.readouterr().out
