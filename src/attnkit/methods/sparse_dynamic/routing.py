"""Routing attention: k-means clusters shared by queries and keys, attention within clusters.

Paper: Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse Attention with
Routing Transformers", arXiv:2003.05997 (TACL 2021). Queries and keys are normalised to
the unit sphere and routed to k shared centroids (online mini-batch k-means, centroids
updated by exponential moving average during training); a query attends only to the keys
of its own cluster (and to earlier positions when causal). The paper uses about sqrt(N)
clusters, so attention costs O(N^1.5 D). Its implementation keeps clusters balanced:
each centroid takes the N / k tokens nearest to it.

Algorithm here (training-free, per batch and KV head):
1. normalise q and k to unit length; seed ``clusters`` centroids with keys picked by a
   seeded random permutation (``seed``), then run ``iters`` spherical k-means (Lloyd)
   iterations on the union of the group's queries and the head's keys — the "online"
   EMA updates of training collapse to these full-batch updates on one input;
2. keys: ``membership="balanced"`` (default, as the paper's code): each centroid takes
   its w = ceil(Nk / clusters) nearest keys, so a key may sit in several clusters or in
   none; ``"nearest"``: each key joins its nearest centroid (clusters of any size);
   queries (per query head) join their nearest centroid;
3. queries are sorted by (cluster, position) and the clusters' key lists laid end to
   end, so each cluster is a contiguous run on both sides;
4. in that order, a query tile lists the key tiles covering the key runs of the clusters
   it holds (and, causal, not wholly in its future); the element rule is "same cluster",
   plus causality on the original positions;
5. the shared block-sparse kernel runs on the permuted tokens; the output is scattered back;
6. anchors: the first ``sink`` keys and the ``local`` keys up to each query are attended
   exactly in the original order; the cluster part skips those pairs, and the two parts
   are merged through their log-sum-exps (``PermutedMethod``), so every pair counts once.

Deliberate deviations: (a) each query joins one cluster (its nearest centroid), where the
paper's balanced top-w membership may put a query in several clusters or none (each
query then gets exactly one key set and a well-defined output); (b) the anchors: the
paper gives local attention to separate heads (half its heads local, half routing); here
every head gets its clusters *and* a sink + local band, since a pretrained model's heads
were not trained to split the work (on SmolLM2, clusters alone leave relative error > 1).
``sink=0, local=0`` is the paper's routing head, plus key 0 for every query so that no
query is left without a key; (c) Lloyd iterations on the input instead of EMA updates
across training batches. Defaults: clusters = round(sqrt(Nk)) when 0, iters 4, seed 0,
membership "balanced", sink 64, local 256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ... import validate
from ...kernels.pattern import cdiv
from ...registry import register
from .permuted import Permutation, PermutedMethod, lookup, pattern_from_mask

MEMBERSHIPS = ("balanced", "nearest")


@register(
    "routing",
    family="dynamic_sparse",
    paper="Efficient Content-Based Sparse Attention with Routing Transformers",
    arxiv="2003.05997",
    year=2020,
)
class Routing(PermutedMethod):
    """Spherical k-means clusters shared by q and k; each query attends to the keys of its cluster."""

    @dataclass
    class Config:
        clusters: int = 0
        iters: int = 4
        seed: int = 0
        block_size: int = 64
        membership: str = "balanced"
        sink: int = 64
        local: int = 256

    def check_config(self) -> None:
        c = self.config
        validate.check_positive(self.name, iters=c.iters, block_size=c.block_size)
        validate.check_non_negative(self.name, sink=c.sink, local=c.local)
        validate.check_choice(self.name, "membership", c.membership, MEMBERSHIPS)
        if isinstance(c.clusters, bool) or not isinstance(c.clusters, int) or c.clusters < 0:
            raise ValueError(f"clusters of method {self.name!r} must be an integer >= 1, or 0 for round(sqrt(Nk)); got {c.clusters!r}")

    def num_clusters(self, nk: int) -> int:
        return self.config.clusters or max(1, round(math.sqrt(nk)))

    def anchors(self) -> tuple[int, int]:
        c = self.config
        if c.sink == 0 and c.local == 0:
            return 1, 0  # the paper's routing head: key 0 keeps every query's key set non-empty
        return c.sink, c.local

    def estimate_permuted(self, q, k, causal, scale):
        c = self.config
        nq, nk = q.shape[2], k.shape[2]
        clusters = min(self.num_clusters(nk), nk)
        centroids, qn, kn = spherical_kmeans(q, k, clusters, c.iters, c.seed)
        cq = nearest(qn, centroids).view(q.shape[0], q.shape[1], nq)
        if c.membership == "balanced":
            kidx, kcl = balanced_members(kn, centroids, cdiv(nk, clusters))
        else:
            kidx, kcl = nearest_members(nearest(kn, centroids))
        return cluster_pattern(cq, kidx, kcl, clusters, nk, causal, c.block_size)


def spherical_kmeans(q: torch.Tensor, k: torch.Tensor, clusters: int, iters: int, seed: int):
    """Spherical k-means shared by a KV head's queries and keys.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D) -> centroids (B, Hkv, C, D) and the unit
    vectors qn (B, Hkv, group * Nq, D) (a group's query heads side by side), kn (B, Hkv, Nk, D).
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    qn = torch.nn.functional.normalize(q.float(), dim=-1).reshape(b, hkv, (hq // hkv) * nq, d)
    kn = torch.nn.functional.normalize(k.float(), dim=-1)
    points = torch.cat([qn, kn], dim=2)  # (B, Hkv, P, D)
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randperm(nk, generator=gen)[:clusters].to(k.device)
    centroids = kn[:, :, seeds]  # (B, Hkv, C, D)
    for _ in range(iters):
        assign = nearest(points, centroids)  # (B, Hkv, P)
        sums = torch.zeros_like(centroids).scatter_add_(2, assign.unsqueeze(-1).expand(-1, -1, -1, d), points)
        empty = sums.norm(dim=-1, keepdim=True) == 0
        centroids = torch.where(empty, centroids, torch.nn.functional.normalize(sums, dim=-1))
    return centroids, qn, kn


def nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, H, P, D) unit vectors, (B, H, C, D) centroids -> (B, H, P) nearest centroid."""
    return torch.matmul(points, centroids.transpose(-1, -2)).argmax(-1)


def balanced_members(kn: torch.Tensor, centroids: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each centroid's ``window`` nearest keys, by position: kn (B, Hkv, Nk, D) ->
    key index of each slot (B, Hkv, C * window) and the cluster of each slot (same shape)."""
    b, hkv, nk, _ = kn.shape
    clusters = centroids.shape[2]
    window = min(window, nk)
    sims = torch.matmul(centroids, kn.transpose(-1, -2))  # (B, Hkv, C, Nk)
    members = sims.topk(window, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, C, w)
    owner = torch.arange(clusters, device=kn.device).repeat_interleave(window).expand(b, hkv, -1)
    return members.reshape(b, hkv, clusters * window), owner


def nearest_members(ck: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys grouped by their nearest centroid: ck (B, Hkv, Nk) -> key index of each slot
    (sorted by (cluster, position)) and the cluster of each slot, both (B, Hkv, Nk)."""
    nk = ck.shape[-1]
    order = (ck * nk + torch.arange(nk, device=ck.device)).argsort(dim=-1)
    return order, ck.gather(-1, order)


def cluster_pattern(cq: torch.Tensor, kidx: torch.Tensor, kcl: torch.Tensor, clusters: int, nk: int, causal: bool, bs: int):
    """Permuted-order pattern of "same cluster" attention.

    cq: (B, Hq, Nq) cluster of each query; kidx: (B, Hkv, S) original key of each key
    slot, slots grouped by cluster; kcl: (B, Hkv, S) cluster of each slot (non-decreasing).
    Returns (BlockPattern over Nq x S slots, Permutation with the original-order rule).
    """
    b, hq, nq = cq.shape
    hkv, slots = kidx.shape[1:]
    group = hq // hkv
    device = cq.device
    off, slot_off = nk - nq, slots - nq  # causal offset of the original / of the slot order
    perm_q = (cq * nq + torch.arange(nq, device=device)).argsort(dim=-1)  # sorted by (cluster, position)
    cq_s = cq.gather(-1, perm_q)
    counts = torch.zeros(b, hkv, clusters, dtype=torch.long, device=device).scatter_add_(-1, kcl, torch.ones_like(kcl))
    end = counts.cumsum(-1)  # key slots of cluster c: [end - counts, end)
    start = end - counts
    nqb, nkb = cdiv(nq, bs), cdiv(slots, bs)
    pad = nqb * bs - nq
    cq_tiles = torch.nn.functional.pad(cq_s, (0, pad), value=-1).view(b, hq, nqb, bs)
    c_lo = cq_tiles.masked_fill(cq_tiles < 0, clusters).amin(-1).clamp(max=clusters - 1)  # (B, Hq, nQB)
    c_hi = cq_tiles.amax(-1)
    start_q = start.repeat_interleave(group, dim=1).gather(-1, c_lo)
    end_q = end.repeat_interleave(group, dim=1).gather(-1, c_hi)
    kb = torch.arange(nkb, device=device)
    mask = (kb * bs < end_q.unsqueeze(-1)) & ((kb + 1) * bs > start_q.unsqueeze(-1))
    if causal:
        # Drop key tiles whose every key comes after every query of the tile.
        k_first = torch.nn.functional.pad(kidx, (0, nkb * bs - slots), value=nk).view(b, hkv, nkb, bs).amin(-1)
        q_last = torch.nn.functional.pad(perm_q, (0, pad), value=-1).view(b, hq, nqb, bs).amax(-1) + off
        mask = mask & (k_first.repeat_interleave(group, dim=1)[:, :, None, :] <= q_last[..., None])

    def routing_rule(bb, h, q_pos, k_pos):
        q_slot = q_pos - slot_off
        ok = lookup(cq_s, bb, h, q_slot) == lookup(kcl, bb, h, k_pos, group)
        if causal:
            ok = ok & (lookup(kidx, bb, h, k_pos, group) <= lookup(perm_q, bb, h, q_slot) + off)
        return ok

    pattern = pattern_from_mask(mask, bs, bs, nq, slots, mask_mod=routing_rule)
    return pattern, Permutation(q=perm_q, k=kidx, kv_len=nk, rule=_original_rule(cq, kidx, kcl, clusters, nk, causal, group))


def _original_rule(cq, kidx, kcl, clusters, nk, causal, group):
    """The cluster rule in the original token order (for stats: attention-mass recall).

    Builds a (B, Hkv, C, Nk) bool membership table on first use only."""
    b, hkv, _ = kidx.shape
    off = nk - cq.shape[-1]
    table: list[torch.Tensor] = []

    def in_cluster(bb, h, q_pos, k_pos):
        if not table:
            member = torch.zeros(b, hkv, clusters, nk, dtype=torch.bool, device=kidx.device)
            member[torch.arange(b)[:, None, None], torch.arange(hkv)[None, :, None], kcl, kidx] = True
            table.append(member)
        ok = table[0][bb % b, (h // group) % hkv, lookup(cq, bb, h, q_pos - off), k_pos.clamp(0, nk - 1)]
        return ok & (k_pos <= q_pos) if causal else ok

    return in_cluster
