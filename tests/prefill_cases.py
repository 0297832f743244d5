"""Prefill methods with small budgets, shapes and inputs shared by the gradient and
partial-attention tests: every pattern is really sparse at N ~ 1100 (density 0.03 - 0.6)
and Nq * Nk > DENSE_MAX_ELEMS, so ``backend="auto"`` runs the sparse kernels."""

from __future__ import annotations

import torch

import attnkit as ak

D = 16
DENSE_MAX_ELEMS = 1024 * 1024  # attnkit.kernels.DENSE_MAX_ELEMS (not imported: the regressions run on old code too)

# Head patterns of minference, one per query head (a_shape / vertical_slash / block_sparse).
HEAD_PATTERNS = [
    {"pattern": "a_shape", "sink": 4, "window": 64},
    {"pattern": "vertical_slash", "vertical_size": 64, "slash_size": 64},
    {"pattern": "block_sparse", "top_k": 3},
    {"pattern": "a_shape", "sink": 8, "window": 32},
]

# Small budgets: every pattern is really sparse at N ~ 1100 (density 0.03 - 0.6).
CONFIGS: dict[str, dict] = {
    "full": {},
    "streaming": {"sink": 4, "window": 100},
    "sliding_window": {"window": 100},
    "dilated": {"window": 64},
    "power": {"block": 32},
    "block_local_global": {"block": 32},
    "neighborhood": {"kernel_size": 33},
    "vertical_slash": {"vertical_size": 64, "slash_size": 64},
    "flexprefill": {"block": 64, "min_budget": 64, "max_budget": 256},
    "minference": {},  # head_patterns set per shape (one per query head)
    "minference_block": {"top_k": 4},
    "block_topk": {"topk": 4},
    "moba": {"block_size": 64, "topk": 3},
    "pbs": {"threshold": 0.3, "block_size": 32, "segment_size": 128},
    "routing": {"clusters": 4, "sink": 16, "local": 64},
    "hip": {"topk": 64, "block_size": 32, "sink": 16, "local": 64},
    "sea": {"topk": 64, "block_size": 32, "sink": 16, "local": 64},
    "biformer": {"grid": (32, 35), "regions": (4, 5), "topk": 4},  # N = 32 * 35 = 1120
    "hyper": {"min_seq_len": 256, "block_size": 32, "sample_size": 32},  # no pattern: gradchecked below
}

# (B, Hq, Hkv, Nq, Nk): GQA; batch 2 with odd length; Nq < Nk (queries are the last Nq
# positions, causal bottom-right aligned) with odd lengths. Every Nq * Nk > DENSE_MAX_ELEMS.
SHAPES = {
    "gqa-N1100": (1, 4, 2, 1100, 1100),
    "B2-N1111": (2, 2, 1, 1111, 1111),
    "Nq801-Nk1409": (1, 4, 2, 801, 1409),
    "grid-B2-N1120": (2, 2, 1, 1120, 1120),  # biformer's 32 x 35 grid
}

# (method, causal, shape): one or two shapes per method, causal and non-causal where supported.
CASES = [
    ("full", True, "Nq801-Nk1409"),
    ("full", False, "B2-N1111"),
    ("streaming", True, "B2-N1111"),
    ("streaming", False, "Nq801-Nk1409"),
    ("sliding_window", True, "Nq801-Nk1409"),
    ("sliding_window", False, "gqa-N1100"),
    ("dilated", True, "gqa-N1100"),
    ("dilated", False, "B2-N1111"),
    ("power", True, "B2-N1111"),
    ("power", False, "gqa-N1100"),
    ("block_local_global", True, "gqa-N1100"),
    ("block_local_global", False, "B2-N1111"),
    ("neighborhood", True, "Nq801-Nk1409"),
    ("neighborhood", False, "gqa-N1100"),
    ("vertical_slash", True, "gqa-N1100"),
    ("vertical_slash", True, "Nq801-Nk1409"),
    ("flexprefill", True, "B2-N1111"),
    ("flexprefill", True, "Nq801-Nk1409"),
    ("minference", True, "gqa-N1100"),
    ("minference", True, "B2-N1111"),
    ("minference_block", True, "gqa-N1100"),
    ("minference_block", False, "Nq801-Nk1409"),
    ("block_topk", True, "gqa-N1100"),
    ("block_topk", False, "B2-N1111"),
    ("moba", True, "gqa-N1100"),
    ("moba", False, "Nq801-Nk1409"),
    ("pbs", True, "Nq801-Nk1409"),
    ("pbs", False, "gqa-N1100"),
    ("routing", True, "gqa-N1100"),
    ("routing", False, "B2-N1111"),
    ("hip", True, "B2-N1111"),
    ("hip", False, "gqa-N1100"),
    ("sea", True, "gqa-N1100"),
    ("sea", False, "Nq801-Nk1409"),
    ("biformer", False, "grid-B2-N1120"),
]


def prefill_methods() -> list[str]:
    """The softmax prefill methods that approximate softmax attention (the linear family is
    tested in test_linear_*.py; ``act`` changes the distribution on purpose: test_act.py)."""
    return sorted(info.name for info in ak.methods()
                  if "prefill" in info.kinds and info.family != "linear" and info.name != "act")


def config_for(name: str, heads: int) -> dict:
    """The method's small-budget config for ``heads`` query heads."""
    config = dict(CONFIGS[name])
    if name == "minference":
        config["head_patterns"] = HEAD_PATTERNS if heads == 4 else HEAD_PATTERNS[1 : 1 + heads]
    return config


def make_inputs(b, hq, hkv, nq, nk, d=D, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v))
