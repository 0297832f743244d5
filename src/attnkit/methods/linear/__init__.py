"""The linear family: feature-map, gated and delta-rule linear attention (``docs/linear.md``)."""

from . import based, cosformer, delta, gated_delta, gla, hedgehog, kda, lightning, linear, performer, retnet  # noqa: F401
from .state import CosformerState, KVState, LinearState, PerformerState  # noqa: F401
