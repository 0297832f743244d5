"""A static pattern's ``flex_mask_mod`` runs directly in ``torch.nn.attention.flex_attention``
(attention-gym style) and gives attnkit's output."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attnkit as ak

CASES = [  # (method, config, causal, Nq, Nk)
    ("sliding_window", {"window": 24}, True, 96, 160),
    ("streaming", {"sink": 4, "window": 16}, False, 128, 128),
    ("dilated", {"window": 16, "dilation": 2}, True, 128, 128),
    ("power", {"block": 16}, True, 80, 144),
    ("block_local_global", {"block": 16}, False, 128, 128),
    ("neighborhood", {"kernel_size": 17}, True, 128, 128),
]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(("name", "config", "causal", "nq", "nk"), CASES, ids=[c[0] for c in CASES])
def test_flex_attention_with_the_exported_mask_mod_matches_attnkit(name, config, causal, nq, nk):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, nq, 16, generator=gen)
    k, v = (torch.randn(1, 2, nk, 16, generator=gen) for _ in range(2))
    method = ak.get(name, **config)
    mod = method.flex_mask_mod(nq, nk, causal)
    block_mask = create_block_mask(mod, None, None, nq, nk, device="cpu", BLOCK_SIZE=16)
    flex = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    ours = method(q, k, v, causal=causal)
    torch.testing.assert_close(flex, ours, atol=2e-5, rtol=1e-4)
