"""RetrievalAttention: an approximate nearest-neighbour index over the keys; each decode
step attends to the sinks, a recent window and the keys retrieved for its query.

Paper: Liu et al., "RetrievalAttention: Accelerating Long-Context LLM Inference via Vector
Retrieval", arXiv:2409.10516 (2024). Rule: the KV vectors are split into a static part
kept with the model (the first ``sink`` tokens and the last ``recent`` tokens) and the
rest, whose keys go into a vector index (on the CPU); at each decode step the query
retrieves from the index the keys with the largest inner product q.k (maximum inner
product search), and attention runs over the static tokens plus the retrieved ones
(the paper merges the two partial attentions; over the union it is the same softmax).
Here the number retrieved is ``budget - sink - recent`` (at least 1), so ``budget`` is the
tokens attended per step. The full cache is kept (the index holds the keys; values stay
in the cache): nothing is evicted, ``kept_positions`` is every token. Prefill is exact.

Index: faiss (``pip install faiss-cpu``). ``index="hnsw"`` (default) is faiss's
``IndexHNSWFlat`` with the inner-product metric (``hnsw_m`` links, ``ef_search``), an
approximate graph index; ``index="flat"`` is exact search (``IndexFlatIP``), for tests.
Deviations: the paper builds an attention-aware graph (RoarGraph, trained on the
prompt's queries) to bridge the query/key distribution gap; faiss's HNSW is built on the
keys alone. GQA: one index per (batch row, KV head), searched with the mean of the query
heads of that KV head (its inner products are the mean of the heads' inner products), so
each KV head retrieves one set. Tokens leave the recent window into the index as decoding
goes on (incremental ``add``). The index holds float32 copies of the keys on the CPU;
``nbytes`` counts only the cache's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...registry import register
from .base import CachePolicy, LayerView
from .common import ranks

INDEXES = ("hnsw", "flat")


def _faiss() -> Any:
    try:
        import faiss  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("attnkit's 'retrieval' KV-cache policy needs faiss: pip install faiss-cpu") from exc
    return faiss


class _HeadIndex:
    """The index of one (batch row, KV head): slot ids of the keys added so far."""

    def __init__(self, faiss: Any, d: int, kind: str, m: int, ef: int) -> None:
        if kind == "flat":
            base = faiss.IndexFlatIP(d)
        else:
            base = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efSearch = ef
        self.index = faiss.IndexIDMap(base)
        self.base = base  # kept alive with the wrapper
        self.upto = 0  # slots < upto have been considered for the index

    def add(self, keys: torch.Tensor, slots: torch.Tensor) -> None:
        if slots.numel():
            self.index.add_with_ids(keys.float().cpu().numpy(), slots.cpu().numpy().astype("int64"))

    def search(self, query: torch.Tensor, k: int) -> torch.Tensor:
        _, ids = self.index.search(query.float().cpu().numpy()[None], k)
        ids = torch.from_numpy(ids[0])
        return ids[ids >= 0]


@register("retrieval", family="kv_cache",
          paper="RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval",
          arxiv="2409.10516", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class Retrieval(CachePolicy):
    """Keeps the full cache; each decode step attends to sinks + recent window + the keys a
    faiss inner-product index retrieves for its query."""

    mode = "select"

    @dataclass
    class Config:
        sink: int = 4
        recent: int = 64
        index: str = "hnsw"
        hnsw_m: int = 32
        ef_search: int = 64

    def __init__(self, config=None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.faiss = _faiss()
        self.indexes: dict[int, list[list[_HeadIndex]]] = {}  # layer -> [b][h]

    def check_config(self) -> None:
        c = self.config
        for name in ("sink", "recent"):
            v = getattr(c, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"retrieval: {name} must be an int >= 0, got {v!r}")
        if c.index not in INDEXES:
            raise ValueError(f"retrieval: index must be one of {INDEXES}, got {c.index!r}")
        for name in ("hnsw_m", "ef_search"):
            v = getattr(c, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"retrieval: {name} must be a positive int, got {v!r}")

    def score(self, view: LayerView) -> torch.Tensor:  # never evicts
        return view.positions.float()

    def decode_select(self, view: LayerView, q: torch.Tensor, budget: int) -> Optional[torch.Tensor]:
        c = self.config
        valid = view.valid
        b, hkv, length = valid.shape
        if int(valid.sum(dim=-1).max()) <= budget:
            return None
        rank, count = ranks(valid)
        static = valid & ((rank < c.sink) | (rank >= count - c.recent))
        indexed = valid & ~static  # the keys that live in the index now
        k = max(budget - c.sink - c.recent, 1)
        heads = self.indexes.get(view.layer_idx)
        if heads is None or len(heads) != b:
            heads = [[_HeadIndex(self.faiss, view.keys.shape[-1], c.index, c.hnsw_m, c.ef_search) for _ in range(hkv)]
                     for _ in range(b)]
            self.indexes[view.layer_idx] = heads
        qm = q[:, :, -1].float().view(b, hkv, -1, q.shape[-1]).mean(dim=2)  # (B, Hkv, D)
        chosen = static.clone()
        for i in range(b):
            for h in range(hkv):
                head = heads[i][h]
                # slots enter the index once they are past the sinks and out of the recent window
                new = indexed[i, h].nonzero().flatten()
                new = new[new >= head.upto]
                head.add(view.keys[i, h, new], new)
                if new.numel():
                    head.upto = int(new.max()) + 1
                ids = head.search(qm[i, h], k)
                chosen[i, h, ids.to(chosen.device)] = True
        return chosen & valid
