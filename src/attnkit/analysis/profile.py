"""``profile(model, inputs) -> HeadProfile``: per (layer, head) attention scores of a
transformers causal LM on given inputs, computed layer by layer during one forward.

A temporary attention function registered with transformers' ``AttentionInterface`` (as
``bench/tasks/fidelity.capture_qkv`` does) scores each layer's q, k as attention receives
them (RoPE applied) with ``scores.head_scores`` on sampled query rows, then runs exact
attention (tiled, O(N) memory) so the next layer sees the model's own activations. Only
the small per-head results are kept: no Nq x Nk tensor and no stored q/k/v.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..kernels import attention_with_lse
from .scores import PATTERNS, head_scores

SCHEMA = "attnkit.head_profile"
VERSION = 1
PROFILE_FN = "attnkit_profile"
# (layers, heads) float scores, by name; "retrieval" is NaN until retrieval_scores() fills it
SCORES = ("sink", "hidden_sink_mass", "entropy", "entropy_norm", "streaming", "retrieval")
HIGHER_FIRST = {"entropy": False, "entropy_norm": False}  # top(): lowest entropy = most focused


@dataclass
class HeadProfile:
    """Per (layer, head) scores of one model on given inputs.

    Tensors (L, Hq) float64: ``sink``, ``hidden_sink_mass``, ``entropy``, ``entropy_norm``,
    ``streaming``, ``retrieval`` (NaN where not measured); ``pattern_recall`` (L, Hq, 3) in
    ``PATTERNS`` order; ``pattern`` (L, Hq) long index into ``PATTERNS``;
    ``hidden_sinks[l][h]``: list of [position, mean mass]. ``meta``: settings, model, length.
    ``maps``: (L, Hq, bins, bins) coarse attention maps when profiled with ``map_bins`` > 0
    (rows: query-position bins, columns: key-position bins; left out of the JSON).
    """

    sink: torch.Tensor
    hidden_sink_mass: torch.Tensor
    entropy: torch.Tensor
    entropy_norm: torch.Tensor
    streaming: torch.Tensor
    pattern_recall: torch.Tensor
    pattern: torch.Tensor
    hidden_sinks: list[list[list[list[float]]]]
    retrieval: Optional[torch.Tensor] = None
    meta: dict[str, Any] = field(default_factory=dict)
    maps: Optional[torch.Tensor] = None  # (L, Hq, bins, bins) coarse attention maps; not in the JSON

    def __post_init__(self) -> None:
        if self.retrieval is None:
            self.retrieval = torch.full_like(self.sink, math.nan)

    @property
    def layers(self) -> int:
        return self.sink.shape[0]

    @property
    def heads(self) -> int:
        return self.sink.shape[1]

    def pattern_names(self) -> list[list[str]]:
        """(L, Hq) pattern class names."""
        return [[PATTERNS[int(i)] for i in row] for row in self.pattern]

    def score(self, kind: str) -> torch.Tensor:
        """The (L, Hq) tensor of score ``kind`` (one of ``SCORES``)."""
        if kind not in SCORES:
            raise ValueError(f"unknown score {kind!r}; allowed: {', '.join(SCORES)}")
        return getattr(self, kind)

    def top(self, kind: str, n: int = 10) -> list[tuple[int, int, float]]:
        """The ``n`` heads with the highest ``kind`` score (lowest for entropies): [(layer,
        head, value)], NaN left out."""
        values = self.score(kind).flatten()
        keep = torch.nonzero(~torch.isnan(values)).flatten()
        order = values[keep].argsort(descending=HIGHER_FIRST.get(kind, True), stable=True)[:n]
        return [(int(keep[i]) // self.heads, int(keep[i]) % self.heads, float(values[keep[i]])) for i in order]

    def to_json(self, path: str | Path | None = None) -> str:
        """The profile as JSON text (schema ``attnkit.head_profile`` version 1); written to ``path`` if given."""
        record = {"schema": SCHEMA, "version": VERSION, "layers": self.layers, "heads": self.heads,
                  "patterns": list(PATTERNS), "meta": self.meta,
                  **{k: _nan_list(getattr(self, k)) for k in SCORES},
                  "pattern": self.pattern_names(), "pattern_recall": self.pattern_recall.tolist(),
                  "hidden_sinks": self.hidden_sinks}
        text = json.dumps(record, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> "HeadProfile":
        """Read ``to_json``'s output (JSON text or a file path); a wrong schema or version is a ValueError."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError(f"not a head profile: expected schema {SCHEMA!r}, got {data.get('schema') if isinstance(data, dict) else type(data).__name__!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"head profile version {data.get('version')!r} is not supported (this attnkit reads version {VERSION})")
        missing = [k for k in (*SCORES, "pattern", "pattern_recall", "hidden_sinks") if k not in data]
        if missing:
            raise ValueError(f"head profile lacks {', '.join(missing)}")
        shape = (data["layers"], data["heads"])
        t = {k: torch.tensor([[math.nan if x is None else x for x in row] for row in data[k]], dtype=torch.float64)
             for k in SCORES}
        for k, v in t.items():
            if tuple(v.shape) != shape:
                raise ValueError(f"head profile: {k} has shape {tuple(v.shape)}, expected {shape}")
        try:
            pattern = torch.tensor([[PATTERNS.index(p) for p in row] for row in data["pattern"]])
        except ValueError as err:
            raise ValueError(f"head profile: unknown pattern class ({err}); allowed: {', '.join(PATTERNS)}") from None
        return cls(pattern_recall=torch.tensor(data["pattern_recall"], dtype=torch.float64), pattern=pattern,
                   hidden_sinks=data["hidden_sinks"], meta=data.get("meta", {}), **t)


def _nan_list(t: torch.Tensor) -> list:
    return [[None if math.isnan(x) else x for x in row] for row in t.tolist()]


def profile(model: Any, inputs: Any, *, sample_rows: int = 256, sink_tokens: int = 4, window: int = 64,
            alpha: float = 5.0, budget: float = 0.1, max_hidden: int = 8, chunk: int = 64, map_bins: int = 0,
            progress: Optional[Callable[[int], None]] = None) -> HeadProfile:
    """Score every (layer, head) of ``model`` on ``inputs`` (one forward, no generation).

    model: a transformers causal LM (any family whose attention goes through
    ``AttentionInterface``). inputs: input ids (B, N) or a dict / BatchEncoding with
    ``input_ids`` (no padding: the scores average over the batch). ``sample_rows``: query
    rows scored per layer (all rows when >= N; else the last quarter of them are the
    last rows, the rest evenly spaced). ``sink_tokens``, ``window``: the sink and the
    local window of the sink and streaming scores. ``alpha``: ACT's hidden-sink threshold
    (a key with more than ``alpha`` x uniform attention). ``budget``: keys per row of the
    pattern-class comparison, as a share of N (at least 64). ``map_bins`` > 0: also keep a
    coarse (bins x bins) attention map of every head in ``maps``. ``progress(layer)`` is
    called after each layer. Scores: ``analysis.scores`` and docs/analysis.md.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ids = inputs["input_ids"] if not torch.is_tensor(inputs) else inputs
    mask = None if torch.is_tensor(inputs) else inputs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("profile: inputs with padding are not supported; profile one sequence or equal lengths")
    if sample_rows < 1 or sink_tokens < 0 or window < 1:
        raise ValueError(f"profile: sample_rows >= 1, sink_tokens >= 0, window >= 1 needed; got {sample_rows}, "
                         f"{sink_tokens}, {window}")
    found: dict[int, dict[str, Any]] = {}
    settings = dict(sample_rows_=sample_rows, sink_tokens=sink_tokens, window=window, alpha=alpha, budget=budget,
                    max_hidden=max_hidden, chunk=chunk, map_bins=map_bins)

    def scoring(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        idx = getattr(module, "layer_idx", len(found))
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        allowed = None
        if attention_mask is not None:  # padding is refused above: a sliding window or a model's own mask
            allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1e30
        found[idx] = head_scores(query, key, scale, mask=allowed, **settings)
        if progress is not None:
            progress(idx)
        out, _ = attention_with_lse(query, key, value, scale, causal=attention_mask is None, mask=attention_mask)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(PROFILE_FN, scoring)
    ALL_ATTENTION_FUNCTIONS[PROFILE_FN] = scoring  # see fidelity.capture_qkv: a re-wrapped entry shadows register()
    AttentionMaskInterface.register(PROFILE_FN, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(PROFILE_FN)
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(before)
    layers = sorted(found)
    stack = lambda k: torch.stack([found[i][k] for i in layers])  # noqa: E731
    meta = {"tokens": int(ids.shape[-1]), "batch": int(ids.shape[0]), "layers_profiled": layers,
            "rows": found[layers[0]]["rows"] if layers else 0, "sample_rows": sample_rows,
            "sink_tokens": sink_tokens, "window": window, "alpha": alpha, "budget": budget,
            "model": getattr(model.config, "_name_or_path", "") or model.config.model_type}
    return HeadProfile(sink=stack("sink"), hidden_sink_mass=stack("hidden_sink_mass"), entropy=stack("entropy"),
                       entropy_norm=stack("entropy_norm"), streaming=stack("streaming"),
                       pattern_recall=stack("pattern_recall"), pattern=stack("pattern"),
                       hidden_sinks=[found[i]["hidden_sinks"] for i in layers], meta=meta,
                       maps=stack("map") if map_bins and layers else None)
