"""The linear family: feature-map, gated and delta-rule linear attention (``docs/linear.md``)."""

from . import delta, gated_delta, gla, kda, lightning, linear, retnet  # noqa: F401
from .state import KVState, LinearState  # noqa: F401
