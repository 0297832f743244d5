"""The linear family: feature-map and gated linear attention (``docs/linear.md``)."""

from . import gla, lightning, linear, retnet  # noqa: F401
from .state import KVState, LinearState  # noqa: F401
