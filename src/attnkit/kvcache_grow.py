"""Per-slot tensors of a cache layer that grow by one decode token at a time.

``torch.cat([held, new], dim=2)`` copies every held slot at every decode step: at 16k
tokens that copy is most of a small model's decode step (SmolLM2: about half). A
``Growing`` keeps each tensor in a buffer with room to spare and writes the new slots in
place; the layer holds a view of the filled part. The buffer is rebuilt (one copy) when
the layer replaced the tensor (a compression, a reorder) or ran out of room (every
len / 16 steps at least: amortised O(1) per step). Used for decode steps (T = 1) of
caches of at least ``MIN_SLOTS`` slots, without autograd; other appends stay ``cat``.
The spare room is allocated memory and is counted by ``nbytes()`` (at most len / 16 + 64
slots).
"""

from __future__ import annotations

import torch

MIN_SLOTS = 1024  # shorter caches: a copy per step is cheap, and nbytes stays exact


class Growing:
    """Buffers for named tensors (B, H, L, ...) growing along dim 2."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, name: str, current: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``torch.cat([current, new], dim=2)``, as a view of a buffer when it pays."""
        length, t = current.shape[2], new.shape[2]
        if t != 1 or length + t < MIN_SLOTS or new.requires_grad or current.requires_grad:
            self._held.pop(name, None)
            return torch.cat([current, new], dim=2)
        held = self._held.get(name)
        buf = held[0] if held is not None and held[1] is current else None
        if buf is None or buf.shape[2] < length + t:
            room = length + t + max(64, (length + t) // 16)
            buf = current.new_empty(current.shape[:2] + (room,) + current.shape[3:])
            buf[:, :, :length] = current
        buf[:, :, length:length + t] = new
        view = buf[:, :, :length + t]
        self._held[name] = (buf, view)
        return view

    def clear(self) -> None:
        self._held.clear()
