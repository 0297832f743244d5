"""The linear family: feature-map and gated linear attention (``docs/linear.md``)."""

from . import agent, based, cosformer, gla, hedgehog, lightning, linear, performer, retnet, sigmoid  # noqa: F401
from .state import CosformerState, KVState, LinearState, PerformerState  # noqa: F401
