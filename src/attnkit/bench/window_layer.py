"""Time one sliding-window attention layer the way a patched model runs it, against
transformers' own SDPA path with the same mask (``python -m attnkit.bench.window_layer``).

Shapes default to Gemma 3 270M's window layers (4 query heads, 1 KV head, head size
256, window 512). Both sides get the boolean mask transformers builds for the layer
(``sdpa_mask`` with the sliding-window rule); attnkit's side includes reading the mask
(``row_spans``) and runs the exact ``sliding_window`` kernel. Warm-up, then ``repeats``
timed runs each, alternating; prints medians, spreads and the ratio, and the largest
difference of the outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch


def layer_inputs(length: int, heads: int, kv_heads: int, head_dim: int, window: int, seed: int = 0) -> dict[str, Any]:
    """q: (1, heads, N, D), k, v: (1, kv_heads, N, D) float32 and transformers' mask (1, 1, N, N)."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, length, head_dim, generator=g)
    k, v = (torch.randn(1, kv_heads, length, head_dim, generator=g) for _ in range(2))
    mask = sdpa_mask(batch_size=1, q_length=length, kv_length=length,
                     mask_function=sliding_window_causal_mask_function(window), allow_is_causal_skip=False)
    return {"q": q, "k": k, "v": v, "mask": mask}


def _module(heads: int, kv_heads: int) -> torch.nn.Module:
    module = torch.nn.Module()
    module.layer_idx, module.is_causal, module.num_key_value_groups = 0, True, heads // kv_heads
    return module


def runners(inputs: dict[str, Any], window: int, scale: float) -> dict[str, Callable[[], torch.Tensor]]:
    """{"transformers sdpa": fn, "attnkit": fn}: each returns the layer output (1, N, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..layer_attention import attnkit_attention

    q, k, v, mask = inputs["q"], inputs["k"], inputs["v"], inputs["mask"]
    module = _module(q.shape[1], k.shape[1])
    return {
        "transformers sdpa": lambda: sdpa_attention_forward(module, q, k, v, mask, scaling=scale, sliding_window=window)[0],
        "attnkit": lambda: attnkit_attention(module, q, k, v, mask, scaling=scale, sliding_window=window)[0],
    }


def measure(length: int = 16384, heads: int = 4, kv_heads: int = 1, head_dim: int = 256, window: int = 512,
            repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Median / min / max seconds of both sides, the ratio of medians and the max |difference|."""
    inputs = layer_inputs(length, heads, kv_heads, head_dim, window)
    fns = runners(inputs, window, head_dim ** -0.5)
    with torch.inference_mode():
        outs = {name: fn() for name, fn in fns.items()}
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    result: dict[str, Any] = {"length": length, "window": window, "heads": heads, "kv_heads": kv_heads,
                              "head_dim": head_dim, "repeats": repeats, "threads": torch.get_num_threads()}
    for name, values in times.items():
        result[name] = {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
    result["speedup"] = result["transformers sdpa"]["median_s"] / result["attnkit"]["median_s"]
    result["max_abs_diff"] = (outs["attnkit"] - outs["transformers sdpa"]).abs().max().item()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    r = measure(args.length, args.heads, args.kv_heads, args.head_dim, args.window, args.repeats)
    print(f"window layer: N={r['length']}, window={r['window']}, {r['heads']}/{r['kv_heads']} heads x {r['head_dim']}, "
          f"{r['threads']} threads, {r['repeats']} repeats")
    for name in ("transformers sdpa", "attnkit"):
        t = r[name]
        print(f"  {name:18s} median {t['median_s'] * 1e3:9.1f} ms  (min {t['min_s'] * 1e3:.1f}, max {t['max_s'] * 1e3:.1f})")
    print(f"  speedup {r['speedup']:.2f}x   max |difference| {r['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()

