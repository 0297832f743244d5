"""Attention analysis: per (layer, head) sinks, hidden sinks, entropy, streaming-ness,
MInference pattern class and retrieval score of a model on given inputs (docs/analysis.md).

>>> prof = attnkit.analysis.profile(model, input_ids)      # HeadProfile
>>> prof.top("sink", 5); prof.to_json("profile.json")
>>> gates = attnkit.analysis.train_duo_gates(model, tokenizer)   # DuoAttention's optimisation
>>> attnkit.analysis.duo_plan(gates, retrieval_share=0.25)         # {layer: [0/1 per KV head]}
"""

from __future__ import annotations

from .duo_train import duo_head_plan, duo_plan, passkey_sample, train_duo_gates
from .profile import SCORES, HeadProfile, profile
from .retrieval import copy_paste_scores, retrieval_scores, trace_generation
from .scores import PATTERNS, head_scores, sample_rows

__all__ = ["PATTERNS", "SCORES", "HeadProfile", "copy_paste_scores", "duo_head_plan", "duo_plan", "head_scores",
           "passkey_sample", "profile", "retrieval_scores", "sample_rows", "trace_generation", "train_duo_gates"]
