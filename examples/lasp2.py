"""LASP-2: context-parallel linear attention with attnkit on torch.distributed (gloo on CPU).

    torchrun --standalone --nproc-per-node 2 examples/lasp2.py --length 130

Each rank holds a contiguous shard of the sequence; one all-gather of the per-rank
states gives every rank its initial state, and the output equals one process's
(rank 0 prints the max error and the bytes each rank sent). ``--time R`` times R calls
(forward) at ``--length`` and prints the median wall time as a JSON line too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import attnkit as ak
from attnkit import distributed as akd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=130, help="sequence length (any; padded to the rank count)")
    p.add_argument("--methods", default="linear,gla,gated_delta", help="comma-separated linear methods")
    p.add_argument("--heads", type=int, default=4, help="heads (q, k and v)")
    p.add_argument("--dim", type=int, default=32, help="head dim (Dk = Dv)")
    p.add_argument("--time", type=int, default=0, help="time this many calls per method (0: check only)")
    args = p.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    world, n = dist.get_world_size(), args.length
    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank (a real run loads its shard)
    q, k, v = (torch.randn(1, args.heads, n, args.dim, generator=gen) for _ in range(3))
    inputs = {"g": F.logsigmoid(torch.randn(1, args.heads, n, generator=gen)) / 8,
              "beta": torch.sigmoid(torch.randn(1, args.heads, n, generator=gen))}
    for method in args.methods.split(","):
        mine = {name: t for name, t in inputs.items() if name in ak.get(method).inputs}
        shards = [akd.shard(t, layout="contiguous") for t in (q, k, v)]
        sharded = {name: akd.shard(t, layout="contiguous") for name, t in mine.items()}
        out, stats = akd.lasp2(*shards, method=method, total_len=n, return_stats=True, **sharded)
        full = akd.unshard(out, layout="contiguous", total_len=n)
        times, one = [], []  # interleaved: lasp2 on every rank, then one process on rank 0
        for _ in range(args.time):
            dist.barrier()
            start = time.perf_counter()
            akd.lasp2(*shards, method=method, total_len=n, **sharded)
            times.append(time.perf_counter() - start)
            dist.barrier()
            if dist.get_rank() == 0:
                start = time.perf_counter()
                ak.attention(q, k, v, method=method, causal=True, **mine)
                one.append(time.perf_counter() - start)
        if dist.get_rank() == 0:
            err = (full - ak.attention(q, k, v, method=method, causal=True, **mine)).abs().max().item()
            print(f"{method}: ranks {world}  n {n}  max error: {err:.2e}  bytes sent per rank: {stats['bytes_sent']}")
            if times:
                row = {"method": method, "ranks": world, "length": n, "heads": args.heads, "dim": args.dim,
                       "median_s": statistics.median(times), "one_process_s": statistics.median(one),
                       "bytes_sent": stats["bytes_sent"]}
                print(json.dumps(row))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
