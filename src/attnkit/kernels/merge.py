"""The one log-sum-exp merge of partial attention results.

Attention over a union of disjoint key sets, from each set's (out, lse): with
lse = log(sum_i exp(lse_i)), out = sum_i exp(lse_i - lse) out_i — how FlashAttention
merges its tiles, how ring attention merges the K/V shards that visit a rank, and how a
sparse method merges its exact anchors with its estimated part. Every kernel and method
calls this function (``tiled`` merges each fused call into its running rows with it).

Convention: a row with no key in a part has lse_i = -inf (its out_i is ignored, but must
be finite); a row with no key in any part comes out 0 with lse -inf. Differentiable in
every out_i and lse_i, with finite gradients on empty rows. Without gradients the merge
runs in place (``out=``: written straight into the destination, e.g. a strided view of
the running result), the kernels' hot path.
"""

from __future__ import annotations

import torch


def merge_partials(
    parts: list[tuple[torch.Tensor, torch.Tensor]], out: torch.Tensor | None = None, lse_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results over disjoint key sets.

    parts: [(out_i (B, H, N, Dv), lse_i (B, H, N))], lse_i float32 or float64.
    Returns (out (B, H, N, Dv) in the dtype of the first out, lse (B, H, N)); with
    ``out`` / ``lse_out`` given (no gradients), the result is written into them (they may
    be one of the parts: the running result of a kernel).
    """
    if not parts:
        raise ValueError("merge_partials needs at least one (out, lse) part")
    if out is not None:
        return _merge_into(parts, out, lse_out)
    if len(parts) == 1:
        out, lse = parts[0]
        return out.masked_fill(torch.isneginf(lse).unsqueeze(-1), 0.0), lse
    lses = torch.stack([lse for _, lse in parts])
    top = lses.amax(dim=0)
    empty = torch.isneginf(top)
    top = top.masked_fill(empty, 0.0).detach()  # any finite shift gives the same result
    weights = torch.exp(lses - top)  # (P, B, H, N); 0 for empty parts
    norm = weights.sum(dim=0)
    total = torch.where(empty, float("-inf"), top + torch.log(norm.clamp_min(torch.finfo(norm.dtype).tiny)))
    inv = torch.where(empty, 0.0, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny))
    compute = torch.promote_types(parts[0][0].dtype, lses.dtype)
    merged = None
    for (out, _), w in zip(parts, weights):
        # a part's out is ignored where it has no key (it may hold anything there)
        term = torch.where((w > 0).unsqueeze(-1), out.to(compute), 0.0) * (w * inv).to(compute).unsqueeze(-1)
        merged = term if merged is None else merged + term
    return merged.to(parts[0][0].dtype), total


def _merge_into(parts, out: torch.Tensor, lse_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place merge without gradients: out = sum_i w_i out_i, w_i = exp(lse_i - lse)."""
    with torch.no_grad():
        lses = torch.stack([lse for _, lse in parts])
        top = lses.amax(dim=0)
        empty = torch.isneginf(top)
        top.masked_fill_(empty, 0.0)
        weights = torch.exp(lses - top)
        norm = weights.sum(dim=0)
        weights /= norm.clamp_min(torch.finfo(norm.dtype).tiny)
        weights = weights.unsqueeze(-1).to(out.dtype)
        terms = [(o, w) for (o, _), w in zip(parts, weights)]
        # a part that is the destination itself must be read before it is overwritten
        terms.sort(key=lambda t: t[0].data_ptr() != out.data_ptr())
        first, w0 = terms[0]
        torch.mul(first, w0, out=out)
        for o, w in terms[1:]:
            out.addcmul_(o, w)
        lse_out.copy_(torch.where(empty, float("-inf"), top + torch.log(norm)))
    return out, lse_out
