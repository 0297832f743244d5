"""ZipCache: mixed-precision KV-cache quantization, salient tokens at more bits.

Paper: He et al., "ZipCache: Accurate and Efficient KV Cache Quantization with Salient
Token Identification", arXiv:2405.14256 (NeurIPS 2024). Rule: a token's saliency is its
*normalized* attention score, the attention it receives summed over the queries divided by
the number of queries that can see it (causal attention is lower-triangular, so plain
accumulated attention favours early tokens). The ``salient_ratio`` most salient tokens of
each (batch row, KV head) are quantized with ``high_bits`` (4), the others with
``low_bits`` (2). The scores come from probe queries, not from the N x N attention: the
last ``recent_probes`` (5%) of the prompt's queries and ``random_probes`` (5%) drawn at
random from the others (the paper's best hybrid), so the cost is O(0.1 N x N) and the
prompt itself runs any attention (FlashAttention in the paper).

Quantizers (``key_quant`` / ``value_quant``), all asymmetric uniform with the scale and
zero-point of ``common.quantize_groups``:
- ``"channel"``: one group per channel over the tokens of a subset (salient or not) of a
  chunk — the paper's choice for keys (and the official demo's ``mixed_channelwiseQ``);
- ``"cst"``: channel-separable tokenwise quantization (the paper's CSTQuant): channel j is
  divided by ``c_j = sqrt(max_t |x[t, j]|)`` over the subset, each token is quantized over
  all its channels, and multiplied back — the paper's choice for values;
- ``"token"``: KIVI-style groups of ``group_size`` channels per token.
Defaults follow the paper and the official demo: keys ``"channel"``, values ``"cst"``,
``salient_ratio=0.6`` (the demo's unimportant ratio 0.4; 60% at 4/2 bits is the paper's
4.98x on GSM8k), 4/2 bits, a full-precision streaming window of ``residual=100`` tokens
(the demo's ``streaming_gap``).

Streaming: the prompt is quantized at the end of each prefill forward pass (its attention
ran in full precision). New decode tokens stay in full precision until ``residual`` of them
have accumulated; that chunk is then quantized, its salient tokens chosen by the normalized
attention that the decode queries since they arrived gave them (every decode query is a
probe: the attention of each step's query over the window, divided by the number of steps
that saw the token). A chunk's bit-widths are fixed once quantized.

Storage is real: per chunk, packed codes (uint8, 4 per byte at 2 bits), scales/zero-points
(and CST channel factors) in the model dtype, and a 1-bit-per-token salient mask, so
``KVCache.nbytes()`` shows the saving. No eviction, no budget (``KVCache("zipcache")``).

Deviations (deliberate):
- Saliency and quantization groups are per (batch row, KV head); GQA: the normalized scores
  are averaged over the query heads of each KV head (the official code quantizes across
  heads and the batch together).
- Probes are drawn from the queries of each prefill forward pass (a chunked prefill scores
  each chunk's tokens with the chunk's probes, against everything held), seeded by
  ``seed`` + layer index (reproducible).
- Earlier chunks are never re-quantized (the official streaming mode re-compresses the
  whole cache every ``streaming_gap`` steps); decode chunks are scored by the decode
  queries as described above.
- Padding tokens (empty slots) are never salient and are replaced by the subset's mean
  before quantization so they do not widen the ranges of the real tokens.
- Dequantize-then-attend in PyTorch (no fused kernels); the read-out exists only during
  the layer's attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...registry import register
from .base import CachePolicy, LayerView, nbytes_of
from .common import group_mean, window_probs
from .quantize import (
    dequantize_channelwise,
    dequantize_cst,
    dequantize_tokenwise,
    pack_codes,
    quantize_channelwise,
    quantize_cst,
    quantize_tokenwise,
    unpack_codes,
)

BITS = (2, 4, 8)
QUANTIZERS = ("channel", "cst", "token")


def probe_indices(t: int, recent: float, random: float, seed: int) -> torch.Tensor:
    """(P,) long, sorted: which of a forward pass's ``t`` queries probe the saliency — the
    last ``max(1, round(recent * t))`` and ``round(random * t)`` others drawn at random."""
    n_recent = min(t, max(1, round(recent * t)))
    n_random = min(t - n_recent, round(random * t))
    gen = torch.Generator().manual_seed(seed)
    drawn = torch.randperm(t - n_recent, generator=gen)[:n_random].sort().values
    return torch.cat([drawn, torch.arange(t - n_recent, t)])


def probe_saliency(view: LayerView, q: torch.Tensor, query_positions: torch.Tensor,
                   first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention the probe queries q: (B, Hq, P, D) give to the slots ``first:`` of the view:
    (sums (B, Hkv, n) float32, mean over each KV head's query heads; counts (n,): the probes
    that can see each slot). sums / counts is the normalized attention score."""
    view.queries, view.query_positions = q, query_positions
    probs = window_probs(view)[..., first:]  # (B, Hq, P, n), O(P x L)
    sums = group_mean(probs.sum(dim=2), view.keys.shape[1])
    slots = torch.arange(first, view.keys.shape[2], device=q.device)  # nothing is evicted: slot = position
    counts = (query_positions[:, None] >= slots[None, :]).sum(dim=0).float()
    return sums, counts


def salient_order(score: torch.Tensor, valid: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For scores (B, H, n): (salient mask (B, H, n) with exactly ``s`` per head — the highest
    normalized scores, padding last —, order (B, H, n): salient slots then the others, each
    in position order)."""
    ranked = score.masked_fill(~valid, float("-inf"))
    mask = torch.zeros_like(valid)
    if s:
        mask.scatter_(-1, ranked.topk(s, dim=-1).indices, True)
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices
    return mask, order


def _fill_padding(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Replace the tokens of empty slots by the mean of the real ones (inside every range)."""
    w = valid[..., None].to(x.dtype)
    mean = (x * w).sum(dim=2, keepdim=True) / w.sum(dim=2, keepdim=True).clamp(min=1)
    return torch.where(valid[..., None], x, mean)


def encode(x: torch.Tensor, bits: int, kind: str, group: int) -> list[torch.Tensor]:
    """Quantize a subset x: (B, H, m, D) with quantizer ``kind`` -> its tensors."""
    if kind == "channel":
        return list(quantize_channelwise(x, bits))
    if kind == "cst":
        return list(quantize_cst(x, bits))
    return list(quantize_tokenwise(x, bits, group))


def decode(parts: list[torch.Tensor], bits: int, kind: str, group: int, d: int) -> torch.Tensor:
    if kind == "channel":
        return dequantize_channelwise(*parts, bits, d)
    if kind == "cst":
        return dequantize_cst(*parts, bits, d)
    return dequantize_tokenwise(*parts, bits, d, group)


class ZipCacheStore:
    """One layer's ZipCache storage: quantized chunks (salient / regular subsets of keys and
    values, 1-bit salient mask) and the full-precision pending tokens with their saliency
    statistics."""

    def __init__(self, config: ZipCache.Config, seed: int) -> None:
        self.c, self.seed = config, seed
        self.chunks: list[dict] = []  # {"n", "mask", "hi_k", "hi_v", "lo_k", "lo_v"}
        self.k_fp: torch.Tensor | None = None  # (B, H, P, D) pending, full precision
        self.v_fp: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None  # (B, H, P) probe attention received
        self.cnt: torch.Tensor | None = None  # (P,) probes that could see each token

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        b, h, t, _ = k.shape
        self.k_fp = k if self.k_fp is None else torch.cat([self.k_fp, k], dim=2)
        self.v_fp = v if self.v_fp is None else torch.cat([self.v_fp, v], dim=2)
        acc, cnt = torch.zeros(b, h, t, device=k.device), torch.zeros(t, device=k.device)
        self.acc = acc if self.acc is None else torch.cat([self.acc, acc], dim=2)
        self.cnt = cnt if self.cnt is None else torch.cat([self.cnt, cnt])

    def observe(self, view: LayerView, q: torch.Tensor, query_positions: torch.Tensor) -> None:
        """Add the step's probe attention to the pending tokens; quantize them after a prompt
        forward pass, or once ``residual`` decode tokens are pending."""
        t, pending, length = q.shape[2], self.k_fp.shape[2], view.keys.shape[2]
        if pending == 0:
            return
        idx = probe_indices(t, self.c.recent_probes, self.c.random_probes, self.seed).to(q.device)
        sums, counts = probe_saliency(view, q[:, :, idx], query_positions[idx], length - pending)
        self.acc += sums
        self.cnt += counts
        if t > 1 or pending >= self.c.residual:
            self._quantize_pending(view.valid[..., length - pending:])

    def _quantize_pending(self, valid: torch.Tensor) -> None:
        c = self.c
        n = self.k_fp.shape[2]
        s = min(n, max(0, round(c.salient_ratio * n)))
        score = self.acc / self.cnt.clamp(min=1)
        mask, order = salient_order(score, valid, s)
        chunk: dict = {"n": n, "mask": pack_codes(mask.to(torch.uint8), 1)}
        for name, x, kind in (("k", self.k_fp, c.key_quant), ("v", self.v_fp, c.value_quant)):
            x = _fill_padding(x, valid)
            x = x.gather(2, order[..., None].expand_as(x))
            for part, sub, bits in (("hi", x[:, :, :s], c.high_bits), ("lo", x[:, :, s:], c.low_bits)):
                chunk[f"{part}_{name}"] = encode(sub, bits, kind, c.group_size) if sub.shape[2] else None
        self.chunks.append(chunk)
        self.k_fp, self.v_fp = self.k_fp[:, :, n:].clone(), self.v_fp[:, :, n:].clone()
        self.acc, self.cnt = self.acc[:, :, n:].clone(), self.cnt[n:].clone()

    def _decode_chunk(self, chunk: dict, name: str, d: int) -> torch.Tensor:
        c = self.c
        kind = c.key_quant if name == "k" else c.value_quant
        parts = [decode(chunk[f"{p}_{name}"], bits, kind, c.group_size, d)
                 for p, bits in (("hi", c.high_bits), ("lo", c.low_bits)) if chunk[f"{p}_{name}"] is not None]
        sorted_x = torch.cat(parts, dim=2)
        mask = unpack_codes(chunk["mask"], 1, chunk["n"]).bool()
        order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices
        return torch.empty_like(sorted_x).scatter_(2, order[..., None].expand_as(sorted_x), sorted_x)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = [], []
        for chunk in self.chunks:
            keys.append(self._decode_chunk(chunk, "k", self.k_fp.shape[-1]).to(self.k_fp.dtype))
            values.append(self._decode_chunk(chunk, "v", self.v_fp.shape[-1]).to(self.v_fp.dtype))
        return torch.cat([*keys, self.k_fp], dim=2), torch.cat([*values, self.v_fp], dim=2)

    def salient_mask(self) -> torch.Tensor:
        """(B, H, L_quantized) bool: which quantized tokens are held at ``high_bits``."""
        return torch.cat([unpack_codes(ch["mask"], 1, ch["n"]).bool() for ch in self.chunks], dim=2)

    def tensors(self) -> list[torch.Tensor]:
        out = [self.k_fp, self.v_fp, self.acc, self.cnt]
        for chunk in self.chunks:
            out.append(chunk["mask"])
            for key in ("hi_k", "hi_v", "lo_k", "lo_v"):
                out += chunk[key] or []
        return out

    def nbytes(self) -> int:
        return nbytes_of(self.tensors())

    def apply_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.k_fp, self.v_fp, self.acc = fn(self.k_fp), fn(self.v_fp), fn(self.acc)
        for chunk in self.chunks:
            chunk["mask"] = fn(chunk["mask"])
            for key in ("hi_k", "hi_v", "lo_k", "lo_v"):
                if chunk[key] is not None:
                    chunk[key] = [fn(x) for x in chunk[key]]


@register("zipcache", family="kv_cache",
          paper="ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token Identification",
          arxiv="2405.14256", year=2024, supports=("causal", "decode", "gqa"), kinds=("cache",))
class ZipCache(CachePolicy):
    """Keeps every token, quantized: salient tokens (normalized attention of probe queries)
    at ``high_bits``, the rest at ``low_bits``; no eviction, no budget."""

    mode = "store"

    @dataclass
    class Config:
        salient_ratio: float = 0.6
        high_bits: int = 4
        low_bits: int = 2
        key_quant: str = "channel"
        value_quant: str = "cst"
        group_size: int = 32
        residual: int = 100
        recent_probes: float = 0.05
        random_probes: float = 0.05
        seed: int = 0

    def check_config(self) -> None:
        c = self.config
        if not 0 <= c.salient_ratio <= 1:
            raise ValueError(f"zipcache: salient_ratio must be in [0, 1] (fraction of tokens at high_bits), "
                             f"got {c.salient_ratio!r}")
        for name in ("high_bits", "low_bits"):
            if getattr(c, name) not in BITS:
                raise ValueError(f"zipcache: {name} must be one of {BITS}, got {getattr(c, name)!r}")
        if c.low_bits > c.high_bits:
            raise ValueError(f"zipcache: low_bits ({c.low_bits}) must not exceed high_bits ({c.high_bits})")
        for name in ("key_quant", "value_quant"):
            if getattr(c, name) not in QUANTIZERS:
                raise ValueError(f"zipcache: {name} must be one of {QUANTIZERS}, got {getattr(c, name)!r}")
        for name in ("group_size", "residual"):
            if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
                raise ValueError(f"zipcache: {name} must be a positive int, got {getattr(c, name)!r}")
        for name in ("recent_probes", "random_probes"):
            if not 0 <= getattr(c, name) <= 1:
                raise ValueError(f"zipcache: {name} must be in [0, 1] (fraction of a prompt's queries), "
                                 f"got {getattr(c, name)!r}")

    def make_store(self, layer_idx: int) -> ZipCacheStore:
        return ZipCacheStore(self.config, self.config.seed + layer_idx)
