"""``plan(profile) -> Plan``: per layer a prefill method, per (layer, KV head) a role,
derived from a ``HeadProfile``; ``attnkit.apply(model, plan)`` runs it (docs/analysis.md).

Rule. Each KV head gets one score, the mean over its query heads (GQA: query head ``h``
belongs to KV head ``h // (Hq / Hkv)``) of the profile's ``retrieval`` score when the
profile has one (any non-NaN value; NaN counts as 0), else of ``1 - streaming``. The
``round(retrieval_share * L * Hkv)`` KV heads with the highest score, over the whole model,
are **retrieval** heads (ties: lower layer, then lower head first). Of the others, a head
whose mean ``streaming`` score is at least ``streaming_threshold`` is a **streaming**
head; the rest are **sparse** heads. A layer's prefill method follows the role most of its
KV heads have (ties: retrieval, then sparse, then streaming): retrieval -> ``"full"``,
streaming -> ``"streaming"`` with ``streaming``'s sink/window, sparse -> ``prefill``.

What is per layer and per head today: prefill methods are per layer (attnkit runs one
method per attention layer). The cache is per head through the ``duo`` policy: retrieval
heads keep the full cache, every other head (streaming and sparse) keeps ``sink`` first
tokens + recent ones, ``budget`` in all; each head holds only its own tokens in memory
(ragged storage, ``attnkit.kvcache_ragged``). A per-head ``cache`` policy such as ``snapkv``
on the sparse heads only is not available yet: ``cache`` is validated and recorded, and
used as the whole model's policy only when the plan has no retrieval head.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

SCHEMA = "attnkit.plan"
VERSION = 1
ROLES = ("retrieval", "streaming", "sparse")
_TIE_ORDER = ("retrieval", "sparse", "streaming")


def _names(kind: str) -> list[str]:
    from .registry import methods

    return [m.name for m in methods(kind=kind)]


def _check_name(what: str, name: Any, kind: str) -> None:
    allowed = _names(kind)
    if name not in allowed:
        raise ValueError(f"plan: unknown {what} {name!r}; allowed: {', '.join(allowed)}")


@dataclass
class Plan:
    """Per layer a prefill method, per (layer, KV head) a role (``ROLES``).

    ``roles[l][h]``: "retrieval" | "streaming" | "sparse"; ``prefill[l]``: method name of
    layer ``l``; ``prefill_config``: {method name: config} for the methods used (the
    streaming sink/window); ``cache``/``budget``: the cache policy of sparse heads and
    tokens kept per non-retrieval head (None: no attnkit cache); ``scores[l][h]``: the KV
    head's ranking score; ``meta``: how the plan was made.
    """

    roles: list[list[str]]
    prefill: list[str]
    prefill_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache: Optional[str] = "snapkv"
    budget: Optional[int] = None
    query_heads: int = 0
    scores: Optional[list[list[float]]] = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def layers(self) -> int:
        return len(self.roles)

    @property
    def kv_heads(self) -> int:
        return len(self.roles[0]) if self.roles else 0

    def validate(self) -> None:
        """Clear ValueErrors on inconsistent counts, unknown roles and unknown method names."""
        if not self.roles or any(len(r) != self.kv_heads for r in self.roles):
            raise ValueError(f"plan: roles must be {self.layers} layers x the same number of KV heads, "
                             f"got {[len(r) for r in self.roles]}")
        if len(self.prefill) != self.layers:
            raise ValueError(f"plan: {len(self.prefill)} prefill methods for {self.layers} layers")
        for layer, row in enumerate(self.roles):
            for role in row:
                if role not in ROLES:
                    raise ValueError(f"plan: unknown role {role!r} in layer {layer}; allowed: {', '.join(ROLES)}")
        for name in {*self.prefill, *self.prefill_config}:
            _check_name("prefill method", name, "prefill")
        if self.cache is not None:
            _check_name("cache policy", self.cache, "cache")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget < 1):
            raise ValueError(f"plan: budget must be a positive int (tokens per KV head) or None, got {self.budget!r}")

    def check_model(self, model: Any) -> None:
        """Refuse a model whose layer or KV-head count differs from the plan's."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layers = cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        if layers != self.layers:
            raise ValueError(f"plan has {self.layers} layers, the model has {layers}")
        if kv != self.kv_heads:
            raise ValueError(f"plan has {self.kv_heads} KV heads per layer, the model has {kv}")
        if self.query_heads and heads != self.query_heads:
            raise ValueError(f"plan has {self.query_heads} query heads per layer, the model has {heads}")

    def counts(self) -> dict[str, int]:
        """How many KV heads have each role."""
        c = Counter(r for row in self.roles for r in row)
        return {role: c.get(role, 0) for role in ROLES}

    def layer_plan(self) -> dict[str, Any]:
        """The per-layer plan ``attnkit.patching.apply`` takes: {"layers": {l: (name, config)}}
        ("full" becomes None: exact attention)."""
        return {"default": None, "layers": {
            i: None if name == "full" else (name, dict(self.prefill_config.get(name, {})))
            for i, name in enumerate(self.prefill)}}

    def cache_args(self) -> Optional[dict[str, Any]]:
        """``KVCache(**cache_args())`` for this plan, None without a budget: ``duo`` with the
        plan's roles (retrieval = full cache) when any head is a retrieval head, else ``cache``."""
        if self.budget is None or self.cache is None:
            return None
        if not any("retrieval" in row for row in self.roles):
            return {"policy": self.cache, "budget": self.budget}
        sink = int(self.prefill_config.get("streaming", {}).get("sink", 4))
        return {"policy": "duo", "budget": self.budget, "sink": sink,
                "plan": {i: [int(r == "retrieval") for r in row] for i, row in enumerate(self.roles)}}

    def kvcache(self) -> Any:
        """A fresh ``attnkit.KVCache`` for this plan (``cache_args``)."""
        args = self.cache_args()
        if args is None:
            raise ValueError("plan has no budget (or no cache policy): it keeps transformers' own cache")
        from .kvcache import KVCache

        return KVCache(**args)

    def to_json(self, path: str | Path | None = None) -> str:
        """The plan as JSON text (schema ``attnkit.plan`` version 1); written to ``path`` if given."""
        record = {"schema": SCHEMA, "version": VERSION, "layers": self.layers, "kv_heads": self.kv_heads,
                  "query_heads": self.query_heads, "roles": self.roles, "prefill": self.prefill,
                  "prefill_config": self.prefill_config, "cache": self.cache, "budget": self.budget,
                  "scores": self.scores, "meta": self.meta}
        text = json.dumps(record, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, source: str | Path, model: Any = None) -> "Plan":
        """Read ``to_json``'s output (text or a path); ValueError on a wrong schema or version,
        counts that disagree (with the record, or with ``model`` if given), unknown roles or names."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            got = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not an attnkit plan: expected schema {SCHEMA!r}, got {got!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"plan version {data.get('version')!r} is not supported (this attnkit reads version {VERSION})")
        missing = [k for k in ("layers", "kv_heads", "roles", "prefill") if k not in data]
        if missing:
            raise ValueError(f"plan lacks {', '.join(missing)}")
        roles = data["roles"]
        if len(roles) != data["layers"] or any(len(r) != data["kv_heads"] for r in roles):
            raise ValueError(f"plan: roles are {len(roles)} layers x {sorted({len(r) for r in roles})} heads, the "
                             f"record says {data['layers']} layers x {data['kv_heads']} KV heads")
        plan = cls(roles=roles, prefill=data["prefill"], prefill_config=data.get("prefill_config") or {},
                   cache=data.get("cache"), budget=data.get("budget"), query_heads=data.get("query_heads") or 0,
                   scores=data.get("scores"), meta=data.get("meta") or {})
        if model is not None:
            plan.check_model(model)
        return plan


def plan(profile: Any, *, kv_heads: Optional[int] = None, retrieval_share: float = 0.25,
         streaming_threshold: float = 0.9, prefill: str = "vertical_slash",
         streaming: Optional[dict[str, int]] = None, cache: Optional[str] = "snapkv",
         budget: Optional[int] = None) -> Plan:
    """A ``Plan`` from a ``HeadProfile`` (rule in this module's docstring).

    ``kv_heads``: KV heads per layer (default: the profile's query heads, i.e. no GQA);
    ``retrieval_share``: share of all KV heads that keep full attention and cache;
    ``streaming_threshold``: mean streaming score from which a non-retrieval head is a
    streaming head; ``prefill``: the sparse prefill method; ``streaming``: sink/window of
    the streaming method (default ``{"sink": 4, "window": 256}``); ``cache``/``budget``:
    cache policy and tokens kept per non-retrieval KV head (budget None: no attnkit cache).
    """
    streaming = dict(streaming or {"sink": 4, "window": 256})
    if not 0 <= retrieval_share <= 1:
        raise ValueError(f"plan: retrieval_share must be in [0, 1], got {retrieval_share}")
    layers, hq = profile.layers, profile.heads
    hkv = hq if kv_heads is None else int(kv_heads)
    if hkv < 1 or hq % hkv:
        raise ValueError(f"plan: kv_heads={hkv} must divide the profile's {hq} query heads")
    retrieval = profile.retrieval
    if retrieval is not None and not bool(torch.isnan(retrieval).all()):
        raw, source = torch.nan_to_num(retrieval, nan=0.0), "retrieval"
    else:
        raw, source = 1.0 - profile.streaming, "1 - streaming"
    group = lambda t: t.double().reshape(layers, hkv, hq // hkv).mean(-1)  # noqa: E731
    score, stream = group(raw), group(profile.streaming)
    n = int(math.floor(retrieval_share * layers * hkv + 0.5))
    order = score.flatten().argsort(descending=True, stable=True)[:n]
    roles = [["streaming" if float(stream[i, h]) >= streaming_threshold else "sparse" for h in range(hkv)]
             for i in range(layers)]
    for flat in order.tolist():
        roles[flat // hkv][flat % hkv] = "retrieval"
    method = {"retrieval": "full", "streaming": "streaming", "sparse": prefill}
    per_layer = []
    for row in roles:
        c = Counter(row)
        top = max(_TIE_ORDER, key=lambda r: (c.get(r, 0), -_TIE_ORDER.index(r)))
        per_layer.append(method[top])
    config = {"streaming": streaming} if "streaming" in per_layer else {}
    meta = {"rule": f"rank KV heads by mean {source} over their query heads; top {n} retrieval; "
                    f"streaming if mean streaming >= {streaming_threshold}; layer prefill by majority role",
            "retrieval_share": retrieval_share, "streaming_threshold": streaming_threshold, "score": source,
            "sparse_prefill": prefill, "profile_model": profile.meta.get("model", "")}
    return Plan(roles=roles, prefill=per_layer, prefill_config=config, cache=cache, budget=budget,
                query_heads=hq, scores=score.tolist(), meta=meta)
