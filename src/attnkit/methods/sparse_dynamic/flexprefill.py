"""FlexPrefill: per-head choice between query-aware block selection and vertical-slash.

Paper: Lai et al., "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient
Long-Sequence Inference", arXiv:2502.20766 (ICLR 2025).

Estimator, per (batch, query head), on ``block``-token blocks (default 128):

1. The last ``block`` queries attend (causal softmax) to all keys: ``a`` (L x Nk).
   Vertical scores = column means of ``a``; slash scores = sums along diagonals / L.
2. Pattern choice: ``a_bar`` = the vertical scores summed per key block (the true
   block distribution of the last query block); ``a_hat`` = softmax over key blocks of
   mean(last queries) . mean-pooled keys * scale (the pooled estimate). If
   sqrt(JSD(a_hat, a_bar)) < ``tau`` the pooled estimate is trustworthy and the head is
   *query-aware*; otherwise it is *vertical-slash*.
3. Vertical-slash heads: the number of tokens needed to cover ``gamma`` of the vertical
   (slash) mass, in blocks (+1), clipped to [min_budget, max_budget] tokens; that many
   top vertical key blocks and top slash block-diagonals by block-summed scores, plus
   the first key block and diagonal 0, always. Query-aware heads: the smallest set of
   (query block, key block) pairs whose pooled attention softmax(pool(q) pool(k)^T)
   covers ``gamma`` of the total over all query blocks, at most max_budget tokens per
   query block, plus the diagonal tiles and the first key block, plus (as in the
   reference code) min_budget tokens of top vertical blocks and of top slash blocks.
4. Kernel: vertical-slash heads run on the vertical-slash kernel (a slash block s is the
   diagonal offset d = s * block, which makes each ``block``-row query block attend to
   key block i - s exactly; a vertical block is ``block`` columns); query-aware heads run
   on a fused block-sparse kernel (the ``blocks`` backend, ``attnkit.kernels.vertical_slash.blocks_plan``).

Defaults: gamma=0.9, tau=0.1, block=128, min_budget=1024 tokens as in the paper and its
reference code; max_budget=2048 tokens (the reference has none). Deviations:
- ``max_budget`` also caps the query-aware tiles per query block (the forced and
  vertical-slash tiles count in it, the pooled selection fills the rest), and defaults to
  2048: without a cap a head with diffuse attention (e.g. random q/k) selects ~90% of
  all blocks and runs slower than dense SDPA. ``max_budget=None`` is the paper.
- query-aware heads get the reference code's min_budget vertical and slash blocks on top
  of their pooled selection (``qa_vertical_slash=True``, the default: on SmolLM2 it cuts
  the error at 4k from 0.069 to 0.027); ``qa_vertical_slash=False`` keeps the pooled
  selection only, the paper's Algorithm 1;
- the forced first block / diagonal 0 come on top of the gamma-derived counts (the
  reference counts them in, so a one-block budget can never reach a dominant key).
- a batch where a head is query-aware for one sequence and not another runs that head
  query-aware for all sequences.
Causal only (FlexPrefill is a prefill method for decoder LLMs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import validate
from ...kernels.mixed import MixedIndex
from ...kernels.pattern import cdiv
from ...kernels.vertical_slash import VerticalSlashIndex
from ...registry import register
from .common import (
    MixedPatternMethod,
    block_pattern,
    causal_block_mask,
    cumulative_mask,
    diagonal_block_mask,
    diagonal_sums,
    gqa_scores,
    last_query_probs,
    pool,
)


def js_distance(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """sqrt of the Jensen-Shannon divergence (natural log) of distributions on the last dim."""
    p = p.clamp(min=0)
    q = q.clamp(min=0)
    m = (p + q) / 2
    kl_p = (p * (torch.log(p + eps) - torch.log(m + eps))).sum(-1)
    kl_q = (q * (torch.log(q + eps) - torch.log(m + eps))).sum(-1)
    return (0.5 * kl_p + 0.5 * kl_q).clamp(min=0).sqrt()


def _sum_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """(..., N) -> (..., ceil(N / block)) sums."""
    n = x.shape[-1]
    nb = cdiv(n, block)
    return torch.nn.functional.pad(x, (0, nb * block - n)).view(*x.shape[:-1], nb, block).sum(-1)


def _cover_count(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """Number of largest entries whose sum first reaches gamma (scores sum to 1), per row."""
    csum = scores.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return (csum <= gamma).sum(dim=-1) + 1


@dataclass
class FlexPrefillEstimate:
    """What the estimator decided, per (batch, head), besides the pattern."""

    query_aware: torch.Tensor  # (B, Hq) bool
    js: torch.Tensor  # (B, Hq) sqrt JSD


def estimate_flexprefill(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    gamma: float = 0.9,
    tau: float = 0.1,
    block: int = 128,
    min_budget: int = 1024,
    max_budget: int | None = None,
    qa_vertical_slash: bool = True,
) -> tuple[MixedIndex, FlexPrefillEstimate]:
    """FlexPrefill's per-head patterns. q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); causal."""
    b, hq, nq, _d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    nkb = cdiv(nk, block)
    min_blocks = max(1, cdiv(min_budget, block))
    max_blocks = nkb if max_budget is None else max(1, min(nkb, cdiv(max_budget, block)))
    min_blocks = min(min_blocks, max_blocks)

    last = min(block, nq)
    probs = last_query_probs(q, k, last, scale, causal=True)  # (B, Hq, L, Nk)
    vertical = probs.mean(dim=-2)
    slash = diagonal_sums(probs, nk) / last
    del probs
    n_vert = (_cover_count(vertical, gamma) // block + 1).clamp(min_blocks, max_blocks)
    n_slash = (_cover_count(slash, gamma) // block + 1).clamp(min_blocks, max_blocks)
    vertical_blocks = _sum_pool(vertical, block)  # (B, Hq, nKB): a_bar
    slash_blocks = _sum_pool(slash, block)  # entry s: diagonals [s*block, (s+1)*block)

    k_pool = pool(k, block)  # (B, Hkv, nKB, D)
    q_last = q[:, :, nq - last :].float().mean(dim=2, keepdim=True)  # (B, Hq, 1, D)
    estimate = torch.softmax(gqa_scores(q_last, k_pool, scale)[:, :, 0], dim=-1)  # a_hat
    js = js_distance(estimate, vertical_blocks)
    query_aware = js < tau

    vertical_blocks[..., 0] = float("inf")
    slash_blocks[..., 0] = float("inf")
    # The forced first block / diagonal 0 come on top of the gamma budget (the reference
    # counts them in it, so a one-block budget could never reach a dominant key).
    n_vert = (n_vert + 1).clamp(max=nkb)
    n_slash = (n_slash + 1).clamp(max=nkb)
    vert_order = vertical_blocks.topk(int(n_vert.max()), dim=-1).indices
    slash_order = slash_blocks.topk(int(n_slash.max()), dim=-1).indices

    qa_heads = sorted({h for h in range(hq) if bool(query_aware[:, h].any())})
    vs_heads = [h for h in range(hq) if h not in qa_heads]
    device = q.device
    vs = bs = None
    if vs_heads:
        verticals = [[None] * len(vs_heads) for _ in range(b)]
        slashes = [[None] * len(vs_heads) for _ in range(b)]
        for j, h in enumerate(vs_heads):
            for bb in range(b):
                vb = vert_order[bb, h, : int(n_vert[bb, h])].sort().values
                cols = (vb[:, None] * block + torch.arange(block, device=device)).flatten()
                verticals[bb][j] = cols[cols < nk]
                slashes[bb][j] = slash_order[bb, h, : int(n_slash[bb, h])].sort().values * block
        vs = VerticalSlashIndex(verticals, slashes, block, nq, nk)
    if qa_heads:
        reserved = None
        if qa_vertical_slash:
            n_min = min(min_blocks + 1, nkb)
            reserved = _vertical_slash_tiles(vert_order[:, qa_heads, :n_min], slash_order[:, qa_heads, :n_min], block, nq, nk)
        chosen = _query_aware_blocks(q, k, scale, qa_heads, group, block, gamma, max_budget, reserved)
        bs = block_pattern(chosen, block, block, nq, nk, True)
    # A head that is query-aware for one sequence of the batch runs query-aware for all.
    return MixedIndex(vs, vs_heads, bs, qa_heads, hq), FlexPrefillEstimate(query_aware, js)


def _vertical_slash_tiles(vert: torch.Tensor, slash: torch.Tensor, block: int, nq: int, nk: int) -> torch.Tensor:
    """(B, H', nQB, nKB) bool: the tiles of vertical key blocks ``vert`` and block
    diagonals ``slash``, both (B, H', n) long, as the reference code maps them: slash block
    s is tile (i, d(i) - s) of query block i, d(i) its diagonal key block. Causality is
    applied by the caller."""
    nqb, nkb = cdiv(nq, block), cdiv(nk, block)
    device = vert.device
    columns = torch.zeros(*vert.shape[:2], nkb, dtype=torch.bool, device=device)
    columns.scatter_(-1, vert, True)
    out = columns[:, :, None, :].expand(-1, -1, nqb, -1).clone()
    diag = (torch.arange(nqb, device=device) * block + (nk - nq)).clamp(max=nk - 1) // block  # (nQB,)
    target = diag[None, None, :, None] - slash[:, :, None, :]  # (B, H', nQB, n)
    hits = torch.zeros(*vert.shape[:2], nqb, nkb + 1, dtype=torch.bool, device=device)
    hits.scatter_(-1, torch.where(target >= 0, target, nkb), True)
    return out | hits[..., :nkb]


def _query_aware_blocks(q, k, scale, heads, group, block, gamma, max_budget, reserved=None):
    """(B, len(heads), nQB, nKB) bool: the pooled-attention cover of gamma (+ diagonal, first
    block, and the ``reserved`` tiles, e.g. the reference code's vertical-slash blocks).

    ``max_budget`` (a deviation) caps the tiles of each query block, reserved ones included:
    the pooled selection fills what the reserved tiles leave."""
    nq = q.shape[2]
    nk = k.shape[2]
    device = q.device
    kv_for = torch.tensor([h // group for h in heads], device=device)
    scores = gqa_scores(pool(q[:, heads], block), pool(k[:, kv_for], block), scale)  # (B, H', nQB, nKB)
    causal = causal_block_mask(nq, nk, block, block, device)
    scores = scores.masked_fill(~causal, float("-inf"))
    attn = torch.softmax(scores, dim=-1)
    flat = attn.flatten(-2)
    chosen = cumulative_mask(flat, gamma).view_as(attn)
    # The diagonal tiles (every row keeps a key) and the first key block (the sink).
    forced = diagonal_block_mask(nq, nk, block, block, device).clone()
    forced[:, 0] = True
    forced = forced & causal
    if reserved is not None:
        forced = forced | (reserved & causal)
    if max_budget is not None:
        cap = max(1, cdiv(max_budget, block))
        room = (cap - forced.sum(-1, keepdim=True)).clamp(min=0)  # (B, H', nQB, 1)
        ranked = attn.masked_fill(~chosen | forced, -1.0)
        rank = ranked.argsort(dim=-1, descending=True).argsort(dim=-1)
        chosen = chosen & (rank < room)
    return (chosen | forced) & causal


@register(
    "flexprefill",
    family="dynamic_sparse",
    paper="FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference",
    arxiv="2502.20766",
    year=2025,
    supports=("causal", "gqa"),
)
class FlexPrefill(MixedPatternMethod):
    """FlexPrefill: JS divergence picks query-aware vs vertical-slash per head; gamma-coverage budgets."""

    @dataclass
    class Config:
        gamma: float = 0.9
        tau: float = 0.1
        block: int = 128
        min_budget: int = 1024
        max_budget: int | None = 2048
        qa_vertical_slash: bool = True

    def check_config(self) -> None:
        c = self.config
        if not 0 < c.gamma <= 1:
            raise ValueError(f"gamma of method {self.name!r} must be in (0, 1], got {c.gamma!r}")
        if not 0 <= c.tau <= 1:
            raise ValueError(f"tau of method {self.name!r} must be in [0, 1] (sqrt JSD is at most sqrt(ln 2) ~ 0.83), got {c.tau!r}")
        validate.check_positive(self.name, block=c.block, min_budget=c.min_budget, max_budget=c.max_budget)
        if c.max_budget is not None and c.max_budget < c.min_budget:
            raise ValueError(f"max_budget={c.max_budget} of method {self.name!r} must be >= min_budget={c.min_budget}")

    def estimate(self, q, k, causal, scale):
        c = self.config
        index, decision = estimate_flexprefill(
            q, k, scale, c.gamma, c.tau, c.block, c.min_budget, c.max_budget, c.qa_vertical_slash
        )
        self.last_decision = decision  # for inspection and tests
        return index

