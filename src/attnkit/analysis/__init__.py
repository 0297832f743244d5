"""Attention analysis: per (layer, head) sinks, hidden sinks, entropy, streaming-ness,
MInference pattern class and retrieval score of a model on given inputs (docs/analysis.md).

>>> prof = attnkit.analysis.profile(model, input_ids)      # HeadProfile
>>> prof.top("sink", 5); prof.to_json("profile.json")
"""

from __future__ import annotations

from .profile import SCORES, HeadProfile, profile
from .scores import PATTERNS, head_scores, sample_rows

__all__ = ["PATTERNS", "SCORES", "HeadProfile", "head_scores", "profile", "retrieval_scores", "sample_rows"]


def __getattr__(name: str):
    if name in ("retrieval_scores", "copy_paste_scores"):
        from . import retrieval

        return getattr(retrieval, name)
    raise AttributeError(f"module 'attnkit.analysis' has no attribute {name!r}")
