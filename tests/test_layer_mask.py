"""attnkit's mask function (attnkit.layer_mask): transformers' sdpa_mask, except that a
fresh unpadded prefill on a sliding-window layer gets no (T, T) mask, and the layer then
applies its own window. Checked against sdpa_mask itself and, end to end, against the
model's own attention on tiny random Gemma 3 / Mistral models (float64)."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from transformers.masking_utils import (  # noqa: E402
    causal_mask_function,
    chunked_causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

import attnkit as ak  # noqa: E402
from arch_zoo import DECODERS, WINDOW  # noqa: E402
from attnkit import layer_attention  # noqa: E402
from attnkit.layer_mask import attnkit_mask  # noqa: E402

T = 3 * WINDOW + 5  # odd, and the window bites


def sliding(**kw):
    base = dict(batch_size=2, q_length=T, kv_length=T, mask_function=sliding_window_causal_mask_function(WINDOW),
                local_size=WINDOW)
    return {**base, **kw}


def test_unpadded_sliding_prefill_has_no_mask():
    assert attnkit_mask(**sliding()) is None
    assert attnkit_mask(**sliding(attention_mask=torch.ones(2, T, dtype=torch.bool))) is None


@pytest.mark.parametrize("case", ["padding", "decode", "offset", "chunked", "no_skip", "causal"])
def test_every_other_mask_is_sdpa_mask(case):
    padded = torch.ones(2, T, dtype=torch.bool)
    padded[0, :3] = False
    kw = {
        "padding": sliding(attention_mask=padded),
        "decode": sliding(q_length=1, kv_length=T, q_offset=T - 1),
        "offset": sliding(q_length=4, kv_length=T, q_offset=T - 4),
        "chunked": sliding(mask_function=chunked_causal_mask_function(WINDOW, torch.zeros(2, dtype=torch.long))),
        "no_skip": sliding(allow_is_causal_skip=False),
        "causal": dict(batch_size=2, q_length=T, kv_length=T, mask_function=causal_mask_function),
    }[case]
    want = sdpa_mask(**kw)
    got = attnkit_mask(**kw)
    if want is None:
        assert got is None
    else:
        assert got is not None and torch.equal(got, want)


WINDOWED = [a for a in DECODERS if a.window]


def logits(model: torch.nn.Module, ids: torch.Tensor, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("arch", WINDOWED, ids=lambda a: a.name)
def test_window_layers_exact_without_their_mask(arch):
    """Patched, the window layers get no mask (spied) and the logits equal the model's
    own masked attention, unpadded and left-padded (batch 2; the padded rows keep
    transformers' mask)."""
    model = arch.build()
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(1))
    padded = torch.ones(2, T, dtype=torch.long)
    padded[0, :4] = 0
    want, want_padded = logits(model, ids), logits(model, ids, padded)
    seen: list[tuple[int | None, bool]] = []
    inner = layer_attention.attnkit_attention

    def spy(module, q, k, v, mask, *args, **kwargs):
        seen.append((kwargs.get("sliding_window"), mask is None))
        return inner(module, q, k, v, mask, *args, **kwargs)

    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with ak.patch(model):
        # patch() registers attnkit_attention again next time; an entry set on the global
        # instance (as analysis.profile does for its own names) shadows register(): set both
        AttentionInterface.register("attnkit", spy)
        shadow = ALL_ATTENTION_FUNCTIONS._local_mapping.get("attnkit")
        ALL_ATTENTION_FUNCTIONS["attnkit"] = spy
        try:
            got = logits(model, ids)
            window_calls = [no_mask for w, no_mask in seen if w]
            seen.clear()
            got_padded = logits(model, ids, padded)
            padded_calls = [no_mask for w, no_mask in seen if w]
        finally:
            AttentionInterface.register("attnkit", inner)
            if shadow is None:
                del ALL_ATTENTION_FUNCTIONS["attnkit"]
            else:
                ALL_ATTENTION_FUNCTIONS["attnkit"] = shadow
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    if arch.reference == "sdpa":  # transformers' eager Gemma 2 returns NaN rows under left padding
        torch.testing.assert_close(got_padded[1], want_padded[1], rtol=0, atol=1e-9)
        torch.testing.assert_close(got_padded[0, 4:], want_padded[0, 4:], rtol=0, atol=1e-9)
    assert window_calls and all(window_calls), "unpadded window layers should get no (T, T) mask"
    assert padded_calls and not any(padded_calls), "padded window layers keep transformers' mask"


def test_window_layer_decode_after_maskless_prefill_is_exact():
    """generate(): the prefill's window layers run without a mask, the decode steps with
    transformers' cache and mask; greedy tokens equal the model's own."""
    arch = next(a for a in WINDOWED if a.name == "gemma3_text")
    model = arch.build()
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        with ak.patch(model):
            got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_window_layers_gradients_without_their_mask():
    """Training through the mask-less window layers: the parameter gradients of a tiny
    Gemma 3 (float64, T = 3 windows + 5) equal those of the model's own masked attention."""
    arch = next(a for a in WINDOWED if a.name == "gemma3_text")
    model = arch.build()
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(3))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(ids, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads()
    with ak.patch(model):
        got = grads()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11, msg=name)
