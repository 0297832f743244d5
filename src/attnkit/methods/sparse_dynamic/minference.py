"""MInference with per-head patterns: A-shape, vertical-slash or block-sparse, from a plan.

Paper: Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
Dynamic Sparse Attention", arXiv:2407.02490 (2024).

Runs a saved plan (``plan=PATH``, ``layer=i``; written by
``minference_plan.search_head_patterns`` + ``save_plan``) or an explicit
``head_patterns`` list, one pattern per query head (see ``minference_patterns``). The
vertical-slash heads (A-shape included) and the block-sparse heads each run on their own
kernel (``kernels.mixed``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ... import validate
from ...registry import register
from .common import MixedPatternMethod
from .minference_patterns import ARXIV, PAPER, check_head_pattern, estimate_heads
from .minference_plan import load_plan


@register("minference", family="dynamic_sparse", paper=PAPER, arxiv=ARXIV, year=2024, supports=("causal", "gqa"))
class MInference(MixedPatternMethod):
    """MInference with per-head patterns (A-shape / vertical-slash / block-sparse) from a plan."""

    @dataclass
    class Config:
        plan: str | None = None
        layer: int = 0
        head_patterns: list | None = None
        last_q: int = 64

    def check_config(self) -> None:
        c = self.config
        if (c.plan is None) == (c.head_patterns is None):
            raise ValueError(f"method {self.name!r} needs exactly one of plan=PATH (with layer=i) or head_patterns=[...]")
        validate.check_positive(self.name, last_q=c.last_q)
        if c.plan is not None:
            layers = load_plan(c.plan)
            if not (0 <= c.layer < len(layers)):
                raise ValueError(f"layer={c.layer} of method {self.name!r} is out of range: plan {c.plan!r} has {len(layers)} layers")
            self.head_patterns = layers[c.layer]
        else:
            for h, e in enumerate(c.head_patterns):
                check_head_pattern(e, f"head_patterns[{h}]")
            self.head_patterns = list(c.head_patterns)

    def estimate(self, q, k, causal, scale):
        return estimate_heads(q, k, scale, self.head_patterns, self.config.last_q)
