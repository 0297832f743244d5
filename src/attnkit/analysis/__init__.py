"""Attention analysis: per (layer, head) sinks, hidden sinks, entropy, streaming-ness,
MInference pattern class and retrieval score of a model on given inputs (docs/analysis.md).

>>> prof = attnkit.analysis.profile(model, input_ids)      # HeadProfile
>>> prof.top("sink", 5); prof.to_json("profile.json")
"""

from __future__ import annotations

from .profile import SCORES, HeadProfile, profile
from .retrieval import copy_paste_scores, retrieval_scores, trace_generation
from .scores import PATTERNS, head_scores, sample_rows

__all__ = ["PATTERNS", "SCORES", "HeadProfile", "copy_paste_scores", "head_scores", "profile", "retrieval_scores",
           "sample_rows", "trace_generation"]
