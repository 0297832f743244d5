"""The transformers integration across architectures (tiny random models, float64):
``patch(full)`` exact against the model's own attention, a sparse method that bites,
padding (decoder left padding, encoder-decoder left / right padding, teacher-forced and
in ``generate``), the model's own sliding windows run by attnkit's kernel, and clear
refusals. The architectures are listed in tests/arch_zoo.py; docs/architectures.md is
generated from the same list (checked below)."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import attnkit as ak  # noqa: E402
from arch_zoo import ALL, DECODERS, ENCODER_DECODERS, ENCODERS, REFUSED, WINDOW, Arch  # noqa: E402
from attnkit import api, patching  # noqa: E402

T = 24  # prompt length: three windows of WINDOW
ATOL = 1e-9  # float64: measured differences are 0 or ~1e-15
RUNNABLE = DECODERS + ENCODERS + ENCODER_DECODERS
DOC = pathlib.Path(__file__).parents[1] / "docs" / "architectures.md"


def ids_for(batch: int = 2, t: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, t), generator=torch.Generator().manual_seed(seed))


def forward(model: torch.nn.Module, arch: Arch, ids: torch.Tensor, mask=None, decoder_ids=None) -> torch.Tensor:
    kwargs = {"attention_mask": mask}
    if arch.kind == "encoder-decoder":
        kwargs["decoder_input_ids"] = ids[:, :10] if decoder_ids is None else decoder_ids
    with torch.no_grad():
        return model(ids, **kwargs).logits


_MODELS: dict[str, torch.nn.Module] = {}


def model_of(arch: Arch) -> torch.nn.Module:
    if arch.name not in _MODELS:
        _MODELS[arch.name] = arch.build()
    return _MODELS[arch.name]


@pytest.mark.parametrize("arch", RUNNABLE, ids=lambda a: a.name)
def test_full_is_exact(arch):
    model, ids = model_of(arch), ids_for()
    want = forward(model, arch, ids)
    with ak.patch(model, prefill="full"):
        got = forward(model, arch, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    with ak.patch(model):  # no method: the model's own attention (its windows via attnkit's kernel)
        torch.testing.assert_close(forward(model, arch, ids), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("arch", RUNNABLE, ids=lambda a: a.name)
def test_sparse_method_bites_or_is_refused(arch):
    model, ids = model_of(arch), ids_for()
    want = forward(model, arch, ids)
    if arch.exact_only:
        with pytest.raises(ValueError, match="only exact attention"):
            with ak.patch(model, prefill="streaming", sink=2, window=4):
                pass
        assert model.config._attn_implementation == arch.reference  # nothing changed
        return
    with ak.patch(model, prefill="streaming", sink=2, window=4):
        got = forward(model, arch, ids)
    assert (got - want).abs().max() > 1e-3, "the method changed nothing: it did not run"


@pytest.mark.parametrize("arch", DECODERS, ids=lambda a: a.name)
def test_left_padding_equals_each_row_alone(arch):
    model, ids = model_of(arch), ids_for()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with ak.patch(model, prefill="streaming", sink=2, window=4), torch.no_grad():
        both = model(ids, attention_mask=mask, position_ids=positions).logits
        alone = model(ids[1:, 5:]).logits
    torch.testing.assert_close(both[1, 5:], alone[0], rtol=0, atol=1e-8)


@pytest.mark.parametrize("arch", ENCODER_DECODERS, ids=lambda a: a.name)
@pytest.mark.parametrize("side", ["left", "right"])
def test_encoder_decoder_padding_teacher_forced(arch, side):
    model, ids = model_of(arch), ids_for()
    mask = torch.ones_like(ids)
    mask[1, slice(0, 7) if side == "left" else slice(T - 7, T)] = 0
    decoder_ids = ids_for(2, 9, seed=1)
    want = forward(model, arch, ids, mask, decoder_ids)
    with ak.patch(model, prefill="full"):
        got = forward(model, arch, ids, mask, decoder_ids)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)  # every decoder position, padded row included


@pytest.mark.parametrize("arch", ENCODER_DECODERS, ids=lambda a: a.name)
def test_encoder_decoder_generate(arch):
    model, ids = model_of(arch), ids_for()
    mask = torch.ones_like(ids)
    mask[0, T - 6:] = 0
    mask[1, :4] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=1)
    want = model.generate(ids, **kwargs)
    with ak.patch(model, prefill="full"):
        got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)


def window_layers(model: torch.nn.Module) -> list[int]:
    return [i for i, what in patching.assignment(model).items() if "window" in what]


@pytest.mark.parametrize("arch", [a for a in RUNNABLE if a.window and not a.exact_only and not a.softcap],
                         ids=lambda a: a.name)
def test_own_window_runs_attnkit_kernel(arch, monkeypatch):
    """With no method, a window layer runs ``sliding_window`` (the kernel, not masked SDPA)."""
    model, ids = model_of(arch), ids_for()
    seen = []
    real = api.get

    def spy(name, **config):
        seen.append((name, config))
        return real(name, **config)

    monkeypatch.setattr(api, "get", spy)
    from attnkit import layer_attention

    layer_attention._WINDOWED.clear()
    with ak.patch(model):
        forward(model, arch, ids)
        assert window_layers(model), model.attnkit_assignment
    assert any(name == "sliding_window" for name, _ in seen)


def test_method_on_window_layer_is_intersected():
    """Mistral, window 8: streaming(sink=2, window=16) on a window of 8 is the window (the
    method's window is wider), while streaming(sink=2, window=4) within it bites."""
    arch = next(a for a in DECODERS if a.name == "mistral")
    model, ids = model_of(arch), ids_for()
    want = forward(model, arch, ids)
    with ak.patch(model, prefill="streaming", sink=0 + 1, window=2 * WINDOW):
        wide = forward(model, arch, ids)
        assert "within the layer's own window of 8" in model.attnkit_assignment[0]
    # A sink outside the window is not attended: the intersection is the window itself.
    torch.testing.assert_close(wide, want, rtol=0, atol=ATOL)
    with ak.patch(model, prefill="streaming", sink=2, window=4):
        narrow = forward(model, arch, ids)
    assert (narrow - want).abs().max() > 1e-3


def test_within_window_matches_reference():
    from attnkit.methods.sparse_static.within_window import WithinWindow
    from attnkit.reference import reference_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 77, 16, generator=g, dtype=torch.float64) for _ in range(3))
    for causal in (True, False):
        method = WithinWindow(api.get("streaming", sink=3, window=20), api.get("sliding_window", window=11))
        got = method(q, k, v, causal=causal)
        i = torch.arange(77)[:, None]
        j = torch.arange(77)[None]
        near = (i - j < 11) & (i - j >= 0) if causal else (i - j).abs() < 11
        stream = ((j < 3) | (i - j < 20)) & (i >= j) if causal else (j < 3) | ((i - j).abs() < 20)
        want = reference_attention(q, k, v, mask=near & stream, causal=False)
        torch.testing.assert_close(got, want)


def test_assignment_is_logged_and_exposed(caplog):
    arch = next(a for a in DECODERS if a.name == "gemma3_text")
    model = model_of(arch)
    with caplog.at_level("INFO", logger="attnkit.patching"), ak.patch(model, prefill="streaming", sink=2, window=4):
        assert model.attnkit_assignment == {0: "streaming(sink=2, window=4) within the layer's own window of 8",
                                            1: "streaming(sink=2, window=4)"}
    assert "layer 0 runs streaming(sink=2, window=4) within the layer's own window of 8" in caplog.text
    assert not hasattr(model, "attnkit_assignment")


@pytest.mark.parametrize("arch", REFUSED, ids=lambda a: a.name)
def test_unsupported_architectures_are_refused(arch):
    model = arch.build()
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError, match="attnkit"):
        with ak.patch(model):
            pass
    assert model.config._attn_implementation == implementation


def test_unknown_attention_kwarg_is_an_error():
    from attnkit.layer_attention import attnkit_attention

    module = torch.nn.Module()
    q = k = v = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="'s_aux'"):
        attnkit_attention(module, q, k, v, None, s_aux=torch.zeros(2))


def test_softcap_and_bias_are_exact():
    """The exact path against transformers' eager formulas: soft-capped logits (Gemma 2)
    and an additive position bias (T5), with a padding mask."""
    from attnkit.layer_attention import attnkit_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(1, 4, 9, 9, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    mask[1, ..., :2] = False
    module = torch.nn.Module()
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ kr.transpose(-1, -2) * 0.5
    for kwargs, logits in [({"softcap": 3.0}, torch.tanh(scores / 3.0) * 3.0), ({"position_bias": bias}, scores + bias)]:
        out, _ = attnkit_attention(module, q, k, v, mask, scaling=0.5, **kwargs)
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
        want = (probs @ vr).transpose(1, 2)
        torch.testing.assert_close(out[0], want[0])
        torch.testing.assert_close(out[1, 2:], want[1, 2:])


def test_method_with_softcap_is_exact_over_its_allowed_set():
    """Gemma 2 soft-caps its logits: a method runs the dense route, the cap applied over
    exactly the method's allowed set (formula at the function level; on the model, a
    streaming window wider than the prompt equals the model's eager attention)."""
    from attnkit import layer_attention
    from attnkit.layer_attention import LayerMethod, attnkit_attention

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 11, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64) for _ in range(2))
    module = torch.nn.Module()
    module.is_causal = True
    setattr(module, layer_attention.LAYER_ATTR, LayerMethod("streaming", {"sink": 2, "window": 3}))
    out, _ = attnkit_attention(module, q, k, v, None, scaling=0.5, softcap=3.0)
    i, j = torch.arange(11)[:, None], torch.arange(11)[None]
    allowed = (j <= i) & ((j < 2) | (i - j < 3))
    scores = torch.tanh(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.5 / 3.0) * 3.0
    want = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, want.transpose(1, 2))

    arch = next(a for a in DECODERS if a.name == "gemma2")
    model, ids = model_of(arch), ids_for()
    want = forward(model, arch, ids)  # transformers' eager attention
    with ak.patch(model, prefill="streaming", sink=1, window=4 * T):
        assert "soft-capped" in model.attnkit_assignment[1]
        torch.testing.assert_close(forward(model, arch, ids), want, rtol=0, atol=ATOL)


def architecture_table() -> str:
    """The supported-architecture table of docs/architectures.md, from the matrix."""
    rows = ["| architecture | transformers class | kind | own sliding window | sparse prefill methods |",
            "|---|---|---|---|---|"]
    for arch in ALL:
        if arch.kind == "refused":
            continue
        methods = "no: exact only (additive position bias)" if arch.exact_only else \
            "yes (soft-capped logits: exact math over the method's allowed set, dense cost)" if arch.softcap else "yes"
        rows.append(f"| {arch.name} | `{arch.model_class}` | {arch.kind} | {'yes' if arch.window else 'no'} | {methods} |")
    rows.append("")
    rows.append("Refused at `patch()` with the reason: " + ", ".join(f"{a.name} (`{a.model_class}`)" for a in REFUSED) + ".")
    return "\n".join(rows)


def test_docs_list_the_tested_architectures():
    text = DOC.read_text()
    start, end = text.index("<!-- architectures:begin -->"), text.index("<!-- architectures:end -->")
    assert text[start:end].split("-->", 1)[1].strip() == architecture_table(), (
        "docs/architectures.md is out of date: paste tests.test_architectures.architecture_table()")


def test_docs_example_runs_as_written(capsys):
    text = DOC.read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/architectures.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert "sliding_window(8)" in lines[0] and float(lines[1]) < 1e-5
    assert lines[2] == "streaming(sink=2, window=4) within the layer's own window of 8"


def test_window_layer_timing_command_runs(capsys):
    from attnkit.bench import window_layer

    window_layer.main(["--length", "600", "--window", "64", "--head-dim", "32", "--repeats", "1"])
    out = capsys.readouterr().out
    diff = float(out.rsplit("max |difference| ", 1)[1])
    assert "speedup" in out and diff < 1e-5
