"""Independent element rules of the static sparse patterns, written from the papers.

Each rule is plain Python over (i, j) pairs and never calls attnkit's pattern code: the
tests build the mask from these and compare the method against ``reference_attention``.
``rule(config, nq, nk, causal) -> BoolTensor (Nq, Nk)``; query i is at position nk - nq + i.
"""

from __future__ import annotations

import torch


def _from_pairs(nq: int, nk: int, causal: bool, allowed) -> torch.Tensor:
    out = torch.zeros(nq, nk, dtype=torch.bool)
    for qi in range(nq):
        i = nk - nq + qi
        for j in range(nk):
            if causal and j > i:
                continue
            out[qi, j] = bool(allowed(i, j))
    return out


def sliding_window(config: dict, nq: int, nk: int, causal: bool) -> torch.Tensor:
    w = config.get("window", 1024)
    if causal:
        return _from_pairs(nq, nk, causal, lambda i, j: i - w < j)
    return _from_pairs(nq, nk, causal, lambda i, j: abs(i - j) < w)


def streaming(config: dict, nq: int, nk: int, causal: bool) -> torch.Tensor:
    s, w = config.get("sink", 4), config.get("window", 1024)
    if causal:
        return _from_pairs(nq, nk, causal, lambda i, j: j < s or i - w < j)
    return _from_pairs(nq, nk, causal, lambda i, j: j < s or abs(i - j) < w)


def dilated(config: dict, nq: int, nk: int, causal: bool) -> torch.Tensor:
    w, r = config.get("window", 256), config.get("dilation", 2)
    return _from_pairs(nq, nk, causal, lambda i, j: (i - j) % r == 0 and abs(i - j) < w * r)


def full(config: dict, nq: int, nk: int, causal: bool) -> torch.Tensor:
    return _from_pairs(nq, nk, causal, lambda i, j: True)


RULES: dict = {
    "full": [({}, full)],
    "sliding_window": [({"window": 1}, sliding_window), ({"window": 5}, sliding_window), ({"window": 70}, sliding_window)],
    "streaming": [({"sink": 1, "window": 1}, streaming), ({"sink": 4, "window": 9}, streaming), ({"sink": 70, "window": 33}, streaming)],
    "dilated": [({"window": 3, "dilation": 2}, dilated), ({"window": 8, "dilation": 3}, dilated), ({"window": 40, "dilation": 1}, dilated)],
}

# --- more rules below ---


# neighborhood / power / block_local_global (NATTEN, PowerAttention, BigBird) -----------


def _from_pairs_lists(nq: int, nk: int, causal: bool, allowed) -> torch.Tensor:
    """As _from_pairs, built from Python lists (much faster than item assignment)."""
    rows = []
    for qi in range(nq):
        i = nk - nq + qi
        rows.append([(not causal or j <= i) and bool(allowed(i, j)) for j in range(nk)])
    return torch.tensor(rows, dtype=torch.bool).reshape(nq, nk)


def _na_axis_window(x: int, length: int, kernel: int, dilation: int, causal: bool) -> set:
    """Keys of x on one axis: its dilation group listed explicitly, a window of `kernel`
    members centred on x and shifted inward at the borders (causal: x and the kernel - 1
    members before it, fewer at the start)."""
    members = [y for y in range(length) if y % dilation == x % dilation]
    p = members.index(x)
    if causal:
        return set(members[max(0, p - kernel + 1) : p + 1])
    start = p - kernel // 2
    start = max(0, min(start, len(members) - kernel))
    return set(members[start : start + kernel])


def neighborhood(config: dict, nq: int, nk: int, causal: bool) -> torch.Tensor:
    grid = config.get("grid")
    lengths = (nk,) if grid is None else tuple(grid)
    ndim = len(lengths)
    ks, ds = config.get("kernel_size", 7), config.get("dilation", 1)
    ks = (ks,) * ndim if isinstance(ks, int) else tuple(ks)
    ds = (ds,) * ndim if isinstance(ds, int) else tuple(ds)

    def unflatten(t):
        out = []
        for n in reversed(lengths):
            out.append(t % n)
            t //= n
        return out[::-1]

    keys = [unflatten(j) for j in range(nk)]
    rows = []
    for qi in range(nq):
        xs = keys[nk - nq + qi]
        # causal: 1D along the sequence, 3D along time (axis 0) only.
        windows = [_na_axis_window(x, n, k, d, causal and a == 0) for a, (x, n, k, d) in enumerate(zip(xs, lengths, ks, ds))]
        rows.append([all(y in w for y, w in zip(ys, windows)) for ys in keys])
    return torch.tensor(rows, dtype=torch.bool).reshape(nq, nk)


def power(config: dict, nq: int, nk: int, causal: bool) -> torch.Tensor:
    g, w, s = config.get("block", 256), config.get("window_blocks", 5), config.get("sink_blocks", 1)

    def allowed(i, j):
        dist = abs(i // g - j // g)
        return dist < w or j // g < s or bin(dist).count("1") == 1

    return _from_pairs_lists(nq, nk, causal, allowed)


def block_local_global(config: dict, nq: int, nk: int, causal: bool) -> torch.Tensor:
    """BigBird ITC; the random blocks are data drawn by the method (their properties are
    tested in test_neighborhood_power_bigbird.py), the rest is written from the paper."""
    import attnkit as ak

    b, w = config.get("block", 64), config.get("window_blocks", 3)
    g = config.get("global_tokens", 64)
    table = ak.get("block_local_global", **config).random_table(nk, causal).tolist()

    def allowed(i, j):
        qb, kb = i // b, j // b
        local = 0 <= qb - kb < w if causal else abs(qb - kb) <= (w - 1) // 2
        return i < g or j < g or local or table[qb][kb]

    return _from_pairs_lists(nq, nk, causal, allowed)


RULES["neighborhood"] = [
    ({"kernel_size": 3}, neighborhood),
    ({"kernel_size": 5, "dilation": 2}, neighborhood),
    ({"kernel_size": 4, "dilation": 3}, neighborhood),
    ({"kernel_size": 3, "grid": (5, 7)}, neighborhood),
    ({"kernel_size": (3, 5), "dilation": (2, 1), "grid": (7, 6)}, neighborhood),
    ({"kernel_size": (2, 3, 3), "dilation": (1, 2, 1), "grid": (4, 6, 5)}, neighborhood),
]
RULES["power"] = [
    ({"block": 1, "window_blocks": 1, "sink_blocks": 0}, power),
    ({"block": 1, "window_blocks": 4, "sink_blocks": 2}, power),
    ({"block": 8, "window_blocks": 2, "sink_blocks": 1}, power),
    ({"block": 5, "window_blocks": 1, "sink_blocks": 0}, power),
]
RULES["block_local_global"] = [
    ({"block": 8, "window_blocks": 3, "global_tokens": 4, "random_blocks": 2, "seed": 1}, block_local_global),
    ({"block": 16, "window_blocks": 1, "global_tokens": 0, "random_blocks": 1, "seed": 3}, block_local_global),
    ({"block": 5, "window_blocks": 5, "global_tokens": 7, "random_blocks": 3}, block_local_global),
    ({}, block_local_global),
]
