"""MInference vertical-slash: top columns + top diagonals from the last queries' attention.

Paper: Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
Dynamic Sparse Attention", arXiv:2407.02490 (2024).

Per head, the last ``last_q`` queries estimate attention to all keys (last_q x Nk,
softmax, causal). Column sums pick the top ``vertical_size`` columns (the first ``sink``
columns always kept); sums along diagonals d = q - k pick the top ``slash_size``
diagonals (the ``local`` nearest diagonals always kept). As in MInference's kernel, a
selected diagonal makes each 64-row query block attend to the whole key run the
diagonal crosses (see ``attnkit.kernels.vertical_slash``). The estimator is
``minference_patterns.estimate_vertical_slash``.

Defaults, chosen for 4k-64k contexts: last_q=64, vertical_size=1000 (MInference's value;
includes sink=30 forced first columns), slash_size=128 (includes local=100 forced nearest
diagonals, so 28 chosen diagonals; MInference's 6096 targets 128k+ and, with 64-key runs
per diagonal, would be nearly dense at 32k).
"""

from __future__ import annotations

from dataclasses import dataclass

from ... import validate
from ...kernels.vertical_slash import count_pairs, to_block_pattern
from ...registry import register
from .common import DynamicMethod
from .minference_patterns import ARXIV, PAPER, estimate_vertical_slash


@register("vertical_slash", family="dynamic_sparse", paper=PAPER, arxiv=ARXIV, year=2024, supports=("causal", "gqa"))
class VerticalSlash(DynamicMethod):
    """MInference vertical-slash: top columns + top diagonals from the last queries' attention."""

    @dataclass
    class Config:
        vertical_size: int = 1000
        slash_size: int = 128
        last_q: int = 64
        sink: int = 30
        local: int = 100

    def check_config(self) -> None:
        c = self.config
        validate.check_positive(self.name, slash_size=c.slash_size, last_q=c.last_q, local=c.local)
        if isinstance(c.vertical_size, bool) or c.vertical_size < 0 or c.sink < 0:
            raise ValueError(f"vertical_size and sink of method {self.name!r} must be integers >= 0, got {c.vertical_size!r}, {c.sink!r}")

    def estimate(self, q, k, causal, scale):
        c = self.config
        return estimate_vertical_slash(q, k, scale, c.vertical_size, c.slash_size, c.last_q, c.sink, c.local)

    # The estimate is a VerticalSlashIndex: the kernel layer runs it on its own kernel,
    # or on any block backend through ``to_block_pattern``.
    def count_pairs(self, pattern, batch, heads):
        return count_pairs(pattern)

    def to_block_pattern(self, pattern):
        return to_block_pattern(pattern)
