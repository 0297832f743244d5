"""Context-parallel attention with attnkit on torch.distributed (gloo on CPU).

    torchrun --standalone --nproc-per-node 2 examples/context_parallel.py --length 130

Each rank holds a shard of the sequence; ring attention (zigzag) and Ulysses give the
single-process output (rank 0 checks it and prints the max error and the bytes sent).
``--time R`` then times R forward calls of each (after one untimed call, every rank
together; the slowest rank's time per call) and of one process on rank 0, and prints
the medians as a JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
import torch.distributed as dist

import attnkit as ak
from attnkit import distributed as akd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=130, help="sequence length (any; padded to the chunk count)")
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads (divides --heads)")
    p.add_argument("--dim", type=int, default=32, help="head dim")
    p.add_argument("--time", type=int, default=0, help="time this many calls of each (0: check only)")
    args = p.parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)  # the same full tensors on every rank (a real run loads its shard)
    q = torch.randn(1, args.heads, args.length, args.dim, generator=g)
    k, v = (torch.randn(1, args.kv_heads, args.length, args.dim, generator=g) for _ in range(2))

    qs, ks, vs = (akd.shard(t, layout="zigzag") for t in (q, k, v))
    out, stats = akd.ring_attention(qs, ks, vs, causal=True, layout="zigzag", total_len=args.length, return_stats=True)
    ring = akd.unshard(out, layout="zigzag", total_len=args.length)

    qs, ks, vs = (akd.shard(t, layout="contiguous") for t in (q, k, v))
    out, ustats = akd.ulysses_attention(qs, ks, vs, causal=True, total_len=args.length, return_stats=True)
    ulysses = akd.unshard(out, layout="contiguous", total_len=args.length)
    # per-rank compute: query-key score entries each rank computed, gathered on every rank
    pairs = torch.tensor([stats["score_pairs"], ustats["score_pairs"]])
    every = [torch.zeros_like(pairs) for _ in range(dist.get_world_size())]
    dist.all_gather(every, pairs)

    if dist.get_rank() == 0:
        ref = ak.attention(q, k, v, causal=True)
        print(f"ranks: {dist.get_world_size()}  n: {args.length}  ring bytes sent per rank: {stats['bytes_sent']}")
        print(f"ring max error: {(ring - ref).abs().max().item():.2e}")
        print(f"ulysses max error: {(ulysses - ref).abs().max().item():.2e}")
        n, world = args.length, dist.get_world_size()
        print(f"score entries per rank, ring (zigzag): {[int(t[0]) for t in every]} "
              f"(B*Hq*N(N+1)/(2R) = {args.heads * n * (n + 1) / (2 * world):.0f} when 2R divides N)")
        print(f"score entries per rank, ulysses: {[int(t[1]) for t in every]}; "
              f"ulysses bytes sent per rank: {ustats['bytes_sent']}")
    if args.time:
        report = {"ranks": dist.get_world_size(), "n": args.length}
        for name, layout, fn in (("ring_zigzag", "zigzag", akd.ring_attention), ("ulysses", "contiguous",
                                                                               akd.ulysses_attention)):
            qs, ks, vs = (akd.shard(t, layout=layout) for t in (q, k, v))
            kw = {"layout": layout} if name.startswith("ring") else {}
            report[name + "_s"] = _timed(lambda: fn(qs, ks, vs, causal=True, total_len=args.length, **kw), args.time)
        if dist.get_rank() == 0:
            one = _timed(lambda: ak.attention(q, k, v, causal=True), args.time, collective=False)
            print(json.dumps({**report, "one_process_s": one}))
    dist.destroy_process_group()


def _timed(call, repeats: int, collective: bool = True) -> float:
    """Median seconds per call after one untimed call; collective: every rank starts
    together (barrier) and the slowest rank's time counts (max over ranks)."""
    call()
    times = []
    for _ in range(repeats):
        if collective:
            dist.barrier()
        start = time.perf_counter()
        call()
        elapsed = torch.tensor(time.perf_counter() - start)
        if collective:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    return statistics.median(times)


if __name__ == "__main__":
    main()
