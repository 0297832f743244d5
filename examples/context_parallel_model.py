"""A real model's prefill and greedy decoding with the sequence sharded across ranks.

    torchrun --standalone --nproc-per-node 2 examples/context_parallel_model.py --length 4096
    torchrun --standalone --nproc-per-node 4 examples/context_parallel_model.py --length 4096

Each rank runs SmolLM2-135M (``attnkit.models.load``) on its zigzag shard of a prompt
(GPL-3 text, or random tokens where it is absent) under
``attnkit.patch(model, context_parallel=True)``: every attention layer is ring attention,
the K/V of each rank's positions stay on that rank (``ShardedKVCache``), and decoding
merges every rank's partial attention by log-sum-exp. Rank 0 then runs the model in one
process and prints the max logit difference over all positions, whether the greedy tokens
agree, the KV-cache bytes each rank holds and each rank's peak RSS (measured before the
one-process reference runs), then one JSON line with the same numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource

import torch
import torch.distributed as dist

import attnkit as ak
from attnkit import distributed as akd
from attnkit import models

LICENSE = "/usr/share/common-licenses/GPL-3"


def prompt(tokenizer, length: int) -> torch.Tensor:
    """(1, length) token ids: the GPL-3 text repeated, or seeded random ids without it."""
    if os.path.exists(LICENSE):
        with open(LICENSE, encoding="utf-8") as f:
            ids = tokenizer(f.read(), return_tensors="pt").input_ids
        return ids.repeat(1, -(-length // ids.shape[1]))[:, :length]
    return torch.randint(100, tokenizer.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


def greedy(model, first: torch.Tensor, cache, steps: int) -> list[int]:
    """Greedy tokens from ``first`` (B,) through ``cache``, positions from the cache."""
    tokens, token = [int(first[0])], first
    for _ in range(steps - 1):
        token = model(input_ids=token[:, None], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
        tokens.append(int(token[0]))
    return tokens


def max_logit_diff(model, hidden: torch.Tensor, ref: torch.Tensor, rows: int = 512) -> tuple[float, float]:
    """(max |logits - logits_ref|, max |logits_ref|) over every position, the vocabulary
    projection in chunks."""
    diff = scale = 0.0
    for s in range(0, hidden.shape[1], rows):
        ref_logits = model.lm_head(ref[:, s:s + rows])
        diff = max(diff, (model.lm_head(hidden[:, s:s + rows]) - ref_logits).abs().max().item())
        scale = max(scale, ref_logits.abs().max().item())
    return diff, scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096, help="prompt tokens (any; padded to the chunk count)")
    p.add_argument("--model", default="smollm2-135m", help="attnkit.models.load name or a local checkpoint")
    p.add_argument("--layout", default="zigzag", choices=akd.LAYOUTS)
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens to decode")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3600))  # rank 0's reference takes a while
    torch.set_num_threads(args.threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    loaded = models.load(args.model, progress=False)
    model, n = loaded.model, args.length
    ids = prompt(loaded.tokenizer, n)

    with ak.patch(model, context_parallel=True, context_parallel_layout=args.layout), torch.no_grad():
        cache = akd.ShardedKVCache(n, layout=args.layout)
        shard, pos = akd.shard_inputs(ids, layout=args.layout)
        hidden = model.model(input_ids=shard, position_ids=pos, past_key_values=cache, use_cache=True).last_hidden_state
        hidden = akd.unshard(hidden, layout=args.layout, total_len=n, dim=1)  # (1, N, hidden) on every rank
        tokens = greedy(model, model.lm_head(hidden[:, -1]).argmax(-1), cache, args.new_tokens)
    mine = torch.tensor([cache.nbytes(), cache.slots(0), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)

    if rank == 0:
        with torch.no_grad():
            out = model.model(input_ids=ids, use_cache=True)
            ref_tokens = greedy(model, model.lm_head(out.last_hidden_state[:, -1]).argmax(-1), out.past_key_values,
                                args.new_tokens)
            diff, scale = max_logit_diff(model, hidden, out.last_hidden_state)
        one_kv = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
        print(f"model {args.model}  ranks {world}  layout {args.layout}  prompt {n} tokens")
        print(f"max logit difference vs one process: {diff:.2e} (max |logit| {scale:.1f})")
        print(f"greedy tokens ({args.new_tokens}) equal one process: {tokens == ref_tokens}  {tokens}")
        print(f"one process KV cache (prompt + decoded): {one_kv} bytes")
        for r, (kv, slots, rss) in enumerate(t.tolist() for t in every):
            print(f"rank {r}: KV cache {kv} bytes ({slots} positions per layer), peak RSS {rss / 2**20:.0f} MiB")
        print(json.dumps({"model": args.model, "ranks": world, "layout": args.layout, "length": n,
                          "max_logit_diff": diff, "max_abs_logit": scale, "tokens_equal": tokens == ref_tokens, "one_process_kv_bytes": one_kv,
                          "kv_bytes": [int(t[0]) for t in every], "kv_positions": [int(t[1]) for t in every],
                          "peak_rss_bytes": [int(t[2]) for t in every]}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
