"""Whole-model prefill of transformers' hybrid models, unpatched vs ``ak.patch``.

Random small models of each hybrid family (no weights are needed to time a prefill):
2 layers, one linear-attention layer and one softmax layer, hidden 512, a small MoE of
4 experts. Per model and length: transformers' own forward (its pure-PyTorch linear
fallbacks, SDPA on the softmax layer) and the same model under ``ak.patch`` (attnkit's
kernels on the linear layer, attnkit's exact path on the softmax layer), timed
alternately after a warm-up, median and spread over repeats, the max logit difference
of the last position. Used by ``attnkit hybrid-speed``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

MODELS = ("qwen3_next", "kimi_linear", "minimax")
VOCAB = 1024


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """A random 2-layer hybrid model (linear layer, softmax layer) of family ``name``."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                  layer_types=["linear_attention", "full_attention"], pad_token_id=0)
    if name == "qwen3_next":  # Gated DeltaNet: Hk 4, Hv 8, D 64
        config = transformers.Qwen3NextConfig(
            num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_num_key_heads=4,
            linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64, num_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=256,
            full_attention_interval=2, **{k: v for k, v in common.items() if k != "layer_types"})
        model_cls = transformers.Qwen3NextForCausalLM
    elif name == "kimi_linear":  # KDA: 8 heads, D 64; MLA softmax layer
        config = transformers.KimiLinearConfig(
            num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=128, q_lora_rank=None, qk_rope_head_dim=32,
            qk_nope_head_dim=32, v_head_dim=64, num_experts=4, num_experts_per_token=2, moe_intermediate_size=256,
            linear_head_dim=64, linear_num_heads=8, bos_token_id=1, eos_token_id=2, **common)
        model_cls = transformers.KimiLinearForCausalLM
    elif name == "minimax":  # lightning attention: 8 heads, D 64, blocks of 256
        config = transformers.MiniMaxConfig(
            num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=2,
            block_size=256, **common)
        model_cls = transformers.MiniMaxForCausalLM
    else:
        raise ValueError(f"unknown hybrid model {name!r}; allowed: {', '.join(MODELS)}")
    torch.manual_seed(seed)
    return model_cls(config).eval()


@dataclass
class HybridRow:
    """One (model, length): seconds per prefill (median, min, max) unpatched / patched."""

    model: str
    length: int
    transformers_s: float
    attnkit_s: float
    speedup: float
    max_logit_diff: float
    spread: dict = field(default_factory=dict)


def _prefill(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()


def time_model(name: str, n: int, repeats: int = 3, progress: Optional[Callable[[str], None]] = None) -> HybridRow:
    """Time ``name``'s prefill of ``n`` random tokens: transformers vs ``ak.patch``, in turns."""
    from .. import patching

    model = build(name)
    ids = torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
    times: dict[str, list[float]] = {"transformers": [], "attnkit": []}
    logits = {}
    for i in range(repeats + 1):  # the first round warms up
        for side in ("transformers", "attnkit"):
            with patching.patch(model) if side == "attnkit" else contextlib.nullcontext():
                start = time.perf_counter()
                logits[side] = _prefill(model, ids)
                elapsed = time.perf_counter() - start
            if i:
                times[side].append(elapsed)
            if progress:
                progress(f"{name} {n}: {side} {'warm-up' if not i else f'run {i}/{repeats}'}")
    med = {side: statistics.median(ts) for side, ts in times.items()}
    diff = float((logits["transformers"] - logits["attnkit"]).abs().max())
    spread = {side: [min(ts), max(ts)] for side, ts in times.items()}
    return HybridRow(name, n, med["transformers"], med["attnkit"], med["transformers"] / med["attnkit"], diff, spread)


def rows_to_json(rows: list[HybridRow]) -> list[dict]:
    return [asdict(r) for r in rows]
