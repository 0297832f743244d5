"""The KV-cache policy contract: ``CachePolicy``, what it sees of a layer (``LayerView``)
and the storage protocol (``Store``).

A policy declares one ``mode``, what it does to the cache:

- ``"evict"``: the cache is compressed to the budget. The policy writes ``score`` (higher =
  keep); the base keeps each head's top ``budget`` valid slots (``topk_per_head``) and the
  cache gathers them. Override ``select`` for another rule (Ada-KV's budget shared across
  heads), ``layer_budget`` for layer-wise budgets, ``accumulate`` to receive every step's
  attention (H2O);
- ``"select"``: the full cache is kept; ``decode_select`` picks the slots each decode step
  attends to (``budget`` = tokens attended per step);
- ``"store"``: every token is kept, in a storage of the policy's own (``make_store``, a
  ``Store``: quantized or pruned keys); no budget.

What the cache asks is derived from the mode (``evicts``, ``selects``, ``has_budget``,
``accumulates``); a policy that wraps others (``compose``, ``adakv``) answers from its parts
in these methods, never by changing class attributes in ``check_config``.

Conventions (all policies):

- slots: a cache layer holds L slots per (batch row, KV head); ``positions`` (B, Hkv, L)
  are the original token indices (index in the cached sequence, padding included),
  ``-1`` for an empty slot (a padding token, or a slot a head with a smaller budget
  does not use). Valid slots are in increasing position order along L.
- scores: (B, Hkv, L) float, higher = keep; +inf = always keep. Invalid slots are never kept.
- GQA: attention-based scores are computed per query head and averaged (mean) over the
  query heads of each KV head.

Extension points (planned, not implemented):

- a recurrent state (linear-attention layers): a fourth mode whose store holds a fixed-size
  state (B, H, Dk, Dv) instead of slots; such a layer has no positions to score and is
  never compressed, so only ``Store`` (``append`` folds tokens in, ``load`` gives the state)
  and the cache's bookkeeping of ``seen`` apply.

Per-head storage (done, ``attnkit.kvcache_ragged``): once a compression leaves heads with
different numbers of tokens, an evicting policy's layer holds each head's own tokens in a
paged pool; policies still see a ``LayerView`` with padded positions (B, Hkv, L), and its
keys/values are built only if the policy reads them.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Protocol

import torch

from ...configurable import Configurable
from ...errors import NotApplicable
from ...registry import MethodInfo

MODES = ("evict", "select", "store")
WHEN = ("prefill", "decode", "both")


@dataclass
class LayerView:
    """What a policy sees of one cache layer when it scores, selects or accumulates.

    keys, values: (B, Hkv, L, D) (RoPE applied); positions: (B, Hkv, L) long, -1 = empty;
    queries: (B, Hq, W, D) the last W queries this layer attended with (observation
    window), None if the policy asked for none; query_positions: (W,) long, their
    positions; scale: the softmax scale; state: per-slot tensors (B, Hkv, L) of the
    policy, kept aligned with the slots by the cache; seen: tokens seen so far; budget:
    tokens per head kept by the compression being computed.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    queries: Optional[torch.Tensor]
    query_positions: Optional[torch.Tensor]
    scale: float
    layer_idx: int
    num_layers: int
    seen: int
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    budget: int = 0  # tokens per head this compression keeps (largest over batch rows)
    phase: str = "prefill"  # "prefill" if the last forward pass had T > 1 tokens, else "decode"
    rope_theta: Optional[float] = None  # the model's RoPE base, when attnkit's attention saw it

    @functools.cached_property
    def valid(self) -> torch.Tensor:
        """(B, Hkv, L) bool: slots that hold a token (computed once per view: a view lives
        for one scoring / selection call, while the positions do not change)."""
        return self.positions >= 0

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return 1 if self.queries is None else self.queries.shape[1] // self.keys.shape[1]


class Store(Protocol):
    """The storage of a ``"store"`` policy's layer (``make_store``): holds the tokens.

    The cache calls ``append`` in ``update``, attends to ``load()``, and calls ``observe``
    at the end of every attention (after the output is computed, before the read-out is
    dropped) with the layer's view (``keys``/``values`` = the read-out just attended,
    ``positions``, ``scale``), the step's queries q: (B, Hq, T, D) and their positions (T,):
    stores that decide from the prompt's queries (ThinK's key channels, ZipCache's salient
    tokens) compress there; others do nothing.
    """

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add T new tokens k: (B, Hkv, T, Dk), v: (B, Hkv, T, Dv)."""

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys (B, Hkv, L, Dk), values (B, Hkv, L, Dv)): every token, in order, dequantized."""

    def observe(self, view: LayerView, q: torch.Tensor, query_positions: torch.Tensor) -> None:
        """See the step's queries (see the class docstring)."""

    def nbytes(self) -> int:
        """Bytes held."""

    def apply_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every tensor along the batch dim (beam search reorder, repeat)."""


class CachePolicy(Configurable):
    """A KV-cache policy: what to keep. Subclasses define ``Config``, declare ``mode`` and,
    for ``"evict"`` (the default), write ``score``.

    ``default_when``: when the cache compresses unless ``KVCache(when=...)`` says: "prefill"
    (once the prompt is in), "decode" or "both".
    """

    info: ClassVar[MethodInfo]
    mode: ClassVar[str] = "evict"
    default_when: ClassVar[str] = "prefill"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.mode not in MODES:
            raise TypeError(f"{cls.__name__}.mode must be one of {MODES}, got {cls.mode!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{self.name!r} is a KV-cache policy, not an attention operator: use "
                        f"attnkit.KVCache(policy={self.name!r}, budget=...) or attnkit.patch(model, cache=...)")

    # --- the contract, derived from ``mode`` -----------------------------------------

    def evicts(self) -> bool:
        """True if the cache compresses to the budget (``score`` / ``select``)."""
        return self.mode == "evict"

    def selects(self) -> bool:
        """True if each decode step attends to ``decode_select``'s slots."""
        return self.mode == "select"

    def has_budget(self) -> bool:
        """True if the cache needs ``budget`` or ``ratio`` (False: passing one is an error)."""
        return self.mode != "store"

    def accumulates(self) -> bool:
        """True if ``accumulate`` needs every step's attention: a policy that defines it."""
        return type(self).accumulate is not CachePolicy.accumulate

    # --- what the cache asks of a policy -------------------------------------------

    def obs_window(self) -> int:
        """How many of the latest queries the cache keeps for ``score`` (0: none)."""
        return 0

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int) -> int:
        """Tokens per KV head this layer keeps, given the cache's ``budget`` (override for
        layer-wise budgets)."""
        return budget

    def score(self, view: LayerView) -> torch.Tensor:
        """(B, Hkv, L) float importance of each slot; higher = keep; +inf = always keep."""
        raise NotImplementedError(f"policy {self.name!r} (mode {self.mode!r}) has no score")

    def select(self, scores: torch.Tensor, budget: torch.Tensor, view: LayerView) -> torch.Tensor:
        """(B, Hkv, L) bool slots to keep: the top ``budget[b]`` valid slots of each head."""
        return topk_per_head(scores, budget, view.valid)

    def always_kept(self) -> tuple[int, str]:
        """(tokens per head this policy keeps whatever the scores, what they are): e.g.
        SnapKV's observation window, StreamingLLM's sinks. A budget below it is an error."""
        return 0, ""

    def check_budget(self, budget: int, source: str) -> None:
        """Raise if ``budget`` (tokens per head) is below ``always_kept``; ``source`` says
        where the budget came from (``budget=10``, ``ratio=0.9 of 40 tokens``)."""
        need, what = self.always_kept()
        if budget < need:
            raise BudgetBelowAlwaysKept(
                f"{self.name}: a budget of {budget} tokens per head ({source}) is below the {need} tokens it always "
                f"keeps: {what}. Use a budget >= {need}, or lower those settings")

    def keep(self, view: LayerView, budget: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, L) bool slots a compression keeps: ``select`` over ``score``; budget: (B,)."""
        return self.select(self.score(view).float(), budget, view) & view.valid

    def accumulate(self, view: LayerView, probs: torch.Tensor, query_positions: torch.Tensor) -> None:
        """Fold attention probabilities into ``view.state`` (defining it makes ``accumulates``).

        probs: (B, Hq, T, L) float32, the attention of the T newest queries over the slots.
        """

    def held_tensors(self, layer_idx: int) -> list:
        """Tensors the policy itself holds for layer ``layer_idx`` (page summaries, the last
        selection's query), counted by the cache's ``nbytes()``."""
        return []

    def decode_select(self, view: LayerView, q: torch.Tensor, budget: int) -> Optional[torch.Tensor]:
        """(B, Hkv, L) bool slots the decode query q: (B, Hq, 1, D) attends to (None: all)."""
        return None

    def make_store(self, layer_idx: int) -> Optional[Store]:
        """The ``Store`` of one layer's tokens (``"store"`` policies), else None."""
        return None


def topk_per_head(scores: torch.Tensor, budget: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, L) bool: per head, the ``budget[b]`` highest-scoring valid slots.

    scores: (B, Hkv, L); budget: (B,) long. Ties (e.g. several always-kept slots at +inf)
    go to the most recent slot (valid slots are in position order along L).
    """
    scores = scores.masked_fill(~valid, float("-inf"))
    length = scores.shape[-1]
    k = min(int(budget.max()), length)
    # a stable descending sort of the reversed slots: among equal scores the later slot first
    flipped = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :k]
    idx = length - 1 - flipped
    keep_rank = torch.arange(k, device=scores.device).view(1, 1, k) < budget.view(-1, 1, 1)
    sel = torch.zeros_like(valid)
    sel.scatter_(-1, idx, keep_rank.expand_as(idx))
    return sel & valid


class BudgetBelowAlwaysKept(NotApplicable):
    """A KV budget below the tokens a policy always keeps (its window, its sinks)."""


def nbytes_of(tensors: Any) -> int:
    """Bytes allocated for the tensors of an iterable (None entries skipped): the
    ``untyped_storage().nbytes()`` of their distinct storages, so a view counts what it
    keeps alive and a storage shared by several tensors counts once."""
    seen: dict[int, int] = {}
    for x in tensors:
        if x is not None:
            s = x.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())
