"""Base classes of attention methods: input checks, stats, and the static-pattern path.

A method subclass defines ``Config`` (a dataclass) and either ``forward`` (anything) or,
for a position-only sparse pattern, ``mask_mod`` and ``block_mask``; the kernels do the
rest. Hooks, caches and the CLI never appear in a method file.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from .. import validate
from ..configurable import Configurable
from ..kernels import BlockPattern, MaskMod, Needs, compatible_backends, count_allowed_pairs, lists_from_block_mask, run
from ..kernels.pattern import cdiv, slots_of
from ..registry import MethodInfo


@dataclass
class AttentionStats:
    """What a call computed.

    density: allowed (query, key) pairs / pairs allowed by the causal (or full) mask.
    pattern: the BlockPattern the kernel ran (None for dense attention).
    estimator_seconds: time spent choosing the pattern (0 for static patterns).
    backend: the kernel(s) that ran ("exact", "dense", "ranges", "gather", "blocks",
        "vertical_slash", "slots", "flex"; "a+b" when parts of the method ran on different
        kernels).
    """

    method: str
    density: float
    pattern: Optional[BlockPattern]
    estimator_seconds: float
    backend: str
    seconds: float = 0.0


def full_pairs(q_len: int, kv_len: int, causal: bool) -> int:
    """Pairs allowed by the causal (bottom-right aligned) or full mask, per (batch, head)."""
    if not causal:
        return q_len * kv_len
    offset = kv_len - q_len
    return q_len * offset + q_len * (q_len + 1) // 2


class Method(Configurable):
    """A configured attention method: ``m(q, k, v, causal=...)``."""

    info: ClassVar[MethodInfo]

    def __repr__(self) -> str:
        return f"attnkit.get({self.name!r}, {self.config})"

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = False,
        scale: Optional[float] = None,
        backend: str = "auto",
        return_stats: bool = False,
        check_finite: bool = True,
        return_lse: bool = False,
        return_state: bool = False,
    ):
        """Attention. q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) -> (B, Hq, Nq, D).

        Returns ``out``, then ``lse`` (B, Hq, Nq) if ``return_lse``, then stats if
        ``return_stats``. Without ``return_lse`` a query row with no allowed key is an
        error; with it, such a row gets out 0 and lse -inf (a partial result to merge).
        """
        if return_state:
            raise ValueError(f"return_state=True: method {self.name!r} is not a linear method and has no recurrent "
                             f"state; the linear family (attnkit list --family linear) has one")
        self._check_call(q, k, v, causal, scale, check_finite)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        start = time.perf_counter()
        out, lse, stats = self.forward(q, k, v, causal, scale, backend, return_stats, return_lse)
        if not return_lse and lse is not None:
            validate.check_no_empty_rows(lse, self.name)
        if return_stats:
            stats.seconds = time.perf_counter() - start
        result = (out,) + ((lse,) if return_lse else ()) + ((stats,) if return_stats else ())
        return result[0] if len(result) == 1 else result

    def _check_call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: Any, scale: Optional[float],
                    check_finite: bool) -> None:
        """The checks every call makes: q/k/v shapes, dtypes and values, scale, causal flag and
        lengths, and what the method supports."""
        validate.check_qkv(q, k, v, check_finite=check_finite)
        validate.check_scale(scale)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        validate.check_causal_lengths(q.shape[2], k.shape[2], causal)
        self._check_supported(causal, q.shape[1] != k.shape[1])

    def _check_supported(self, causal: bool, gqa: bool) -> None:
        flag = "causal" if causal else "non_causal"
        if flag not in self.info.supports:
            raise ValueError(f"method {self.name!r} does not support causal={causal}; it supports {self.info.supports}")
        if gqa and "gqa" not in self.info.supports:
            raise ValueError(f"method {self.name!r} does not support Hq != Hkv (GQA/MQA)")

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, backend: str,
        want_stats: bool, want_lse: bool,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], AttentionStats]:
        """(out (B, Hq, Nq, Dv), lse (B, Hq, Nq) or None, stats). lse may be None only when
        ``want_lse`` is False and the kernel that ran has none (FlexAttention on the CPU)."""
        raise NotImplementedError

    def patterns(self, q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> list:
        """The patterns this method runs for these inputs (each part a kernel runs)."""
        raise NotImplementedError

    def compatible_backends(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                            scale: Optional[float] = None, training: bool = False, return_lse: bool = False) -> list[str]:
        """Backends that ``backend=`` accepts for this call: those that can run every part."""
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        needs = Needs(training=training, return_lse=return_lse or len(self.patterns(q, k, causal, scale)) > 1)
        sets = [compatible_backends(p, q, k, v, needs) for p in self.patterns(q, k, causal, scale)]
        return [name for name in sets[0] if all(name in s for s in sets[1:])]


class OwnKernelMethod(Method):
    """A method that runs its own computation rather than a pattern (``full`` on the exact
    kernel, ``hyper``): ``backend`` must be "auto" or ``own_backend``."""

    own_backend: ClassVar[str]

    def patterns(self, q, k, causal, scale):
        return []

    def compatible_backends(self, q, k, v, causal=False, scale=None, training=False, return_lse=False):
        return [self.own_backend]

    def check_backend(self, backend: str) -> None:
        if backend not in ("auto", self.own_backend):
            raise ValueError(f"method {self.name!r} runs its own kernel, not a pattern: backend must be 'auto' or "
                             f"{self.own_backend!r}, got {backend!r}")


class PatternMethod(Method):
    """A static (position-only) sparse pattern run by the shared kernels.

    Subclasses implement ``mask_mod(causal)`` (the exact element rule, causality
    included) and ``block_mask(q_len, kv_len, causal, device)`` (a superset at block
    granularity; the default evaluates the rule on every pair, which is O(N^2) time).
    """

    block_q: ClassVar[int] = 256  # query rows per kernel call: large blocks amortise the fused SDPA calls
    block_k: ClassVar[int] = 64

    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._patterns: dict[tuple, BlockPattern] = {}

    def mask_mod(self, causal: bool, kv_len: Optional[int] = None, device: Optional[torch.device] = None) -> MaskMod:
        """The element rule for this causality (and key length / device, for rules that
        hold length-dependent tables)."""
        raise NotImplementedError

    def flex_mask_mod(self, q_len: int, kv_len: int, causal: bool, device: Optional[torch.device] = None) -> MaskMod:
        """The pattern as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for Nq = ``q_len``
        queries over Nk = ``kv_len`` keys: ``q_idx`` counts from the first query (the
        queries are the last Nq positions), so it goes straight into
        ``torch.nn.attention.flex_attention.create_block_mask(mod, B, H, q_len, kv_len)``."""
        rule = self.mask_mod(causal, kv_len, device)
        offset = kv_len - q_len

        def flex_mod(b, h, q_idx, kv_idx):
            return rule(b, h, q_idx + offset, kv_idx)

        return flex_mod

    def block_size(self) -> tuple[int, int]:
        return self.block_q, self.block_k

    def block_mask(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> torch.Tensor:
        """(nQB, nKB) bool (or (Bp, Hp, nQB, nKB)): tiles that hold an allowed pair."""
        bq, bk = self.block_size()
        rule = self.mask_mod(causal, kv_len, device)
        offset = kv_len - q_len
        nqb, nkb = cdiv(q_len, bq), cdiv(kv_len, bk)
        out = torch.zeros(nqb, nkb, dtype=torch.bool, device=device)
        k_pos = torch.arange(kv_len, device=device)
        zero = torch.zeros((), dtype=torch.long, device=device)
        for qb in range(nqb):
            q_pos = torch.arange(qb * bq, min(q_len, (qb + 1) * bq), device=device)[:, None] + offset
            hit = rule(zero, zero, q_pos, k_pos[None, :]).any(dim=0)
            hit = torch.nn.functional.pad(hit, (0, nkb * bk - kv_len))
            out[qb] = hit.view(nkb, bk).any(dim=-1)
        return out

    def full_block_mask(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> Optional[torch.Tensor]:
        """(nQB, nKB) bool tiles whose every pair is allowed (a speed hint; None = unknown)."""
        return None

    def pattern(self, q_len: int, kv_len: int, causal: bool, device: torch.device) -> BlockPattern:
        """The BlockPattern for these lengths (cached per shape and device)."""
        key = (q_len, kv_len, causal, str(device))
        if key not in self._patterns:
            bq, bk = self.block_size()
            mask = self.block_mask(q_len, kv_len, causal, torch.device(device))
            while mask.dim() < 4:
                mask = mask.unsqueeze(0)
            lists = lists_from_block_mask(mask)
            full = self.full_block_mask(q_len, kv_len, causal, torch.device(device))
            self._patterns[key] = BlockPattern(
                kv_blocks=lists,
                full_tiles=None if full is None else slots_of(full, lists),
                block_q=bq,
                block_k=bk,
                q_len=q_len,
                kv_len=kv_len,
                mask_mod=self.mask_mod(causal, kv_len, torch.device(device)),
                position_only=True,
            )
        return self._patterns[key]

    def patterns(self, q, k, causal, scale):
        return [self.pattern(q.shape[2], k.shape[2], causal, q.device)]

    def forward(self, q, k, v, causal, scale, backend, want_stats, want_lse):
        pattern = self.pattern(q.shape[2], k.shape[2], causal, q.device)
        out, lse, used = run(pattern, q, k, v, scale, backend, return_lse=want_lse, method=self.name)
        density = float("nan")
        if want_stats:
            pairs = count_allowed_pairs(pattern, q.shape[0], q.shape[1])
            density = pairs / (full_pairs(q.shape[2], k.shape[2], causal) * q.shape[0] * q.shape[1])
        return out, lse, AttentionStats(self.name, density, pattern, 0.0, used)
