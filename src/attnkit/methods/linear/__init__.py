"""The linear family: feature-map, gated and delta-rule linear attention, and the
softmax-free quadratic methods `sigmoid` and `agent` (``docs/linear.md``)."""

from . import (  # noqa: F401
    agent,
    based,
    cosformer,
    delta,
    gated_delta,
    gla,
    hedgehog,
    kda,
    lightning,
    linear,
    performer,
    retnet,
    sigmoid,
)
from .state import CosformerState, KVState, LinearState, PerformerState  # noqa: F401
