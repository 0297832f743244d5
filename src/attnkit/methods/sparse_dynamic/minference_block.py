"""MInference block-sparse: top-k 64x64 blocks per query block from mean-pooled q, k.

Paper: Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
Dynamic Sparse Attention", arXiv:2407.02490 (2024).

q and k are mean-pooled over 64-token blocks; pooled scores (causal) pick the top
``top_k`` key blocks per query block (``minference_patterns.block_sparse_mask``).
Deviation: the diagonal block and the first block are always kept, so every row has a
key and the sink is never lost. Default top_k=64 blocks of 64 keys (4096 keys per query
block).
"""

from __future__ import annotations

from dataclasses import dataclass

from ... import validate
from ...registry import register
from .common import DynamicMethod, block_pattern
from .minference_patterns import ARXIV, BLOCK, PAPER, block_sparse_mask


@register("minference_block", family="dynamic_sparse", paper=PAPER, arxiv=ARXIV, year=2024)
class MInferenceBlock(DynamicMethod):
    """MInference block-sparse: top-k 64x64 blocks per query block from mean-pooled q, k."""

    @dataclass
    class Config:
        top_k: int = 64

    def check_config(self) -> None:
        validate.check_positive(self.name, top_k=self.config.top_k)

    def estimate(self, q, k, causal, scale):
        mask = block_sparse_mask(q, k, scale, self.config.top_k, causal)
        return block_pattern(mask, BLOCK, BLOCK, q.shape[2], k.shape[2], causal)
