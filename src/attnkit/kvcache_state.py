"""``StateLayer``: the layer of an ``attnkit.KVCache`` that a linear-attention layer of a
hybrid model (Qwen3-Next / Qwen3.5 / OLMo-hybrid gated DeltaNet, MiniMax lightning
attention) reads and writes: its recurrent state and the short-convolution state kept
beside it, O(1) memory per token (no policy applies: nothing grows with the length).

It is transformers' own ``LinearAttentionLayer`` (so ``get_conv_state``,
``update_conv_state``, ``get_recurrent_state``, ``update_recurrent_state``,
``has_previous_state``, ``is_linear`` and the masks behave exactly as with transformers'
cache), plus what ``KVCache`` asks of its layers: ``nbytes``, batch selection and
``flush``. MiniMax's layers keep one state through ``get_linear_cache`` /
``set_linear_cache``; ``KVCache`` stores it as this layer's recurrent state.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import LinearAttentionLayer

from .methods.kvcache.base import nbytes_of


class StateLayer(LinearAttentionLayer):
    """Recurrent + convolution states of one linear-attention layer.

    conv_states[i]: (B, channels, kernel) in the model's dtype (gated DeltaNet, KDA);
    recurrent_states[i]: (B, Hv, Dk, Dv), float32 for gated DeltaNet / KDA, the value
    dtype for MiniMax.
    """

    def __init__(self, cache: object, layer_idx: int, number_of_states: int = 1) -> None:
        super().__init__(number_of_states=number_of_states)
        self.cache = cache
        self.layer_idx = layer_idx

    # what KVCache expects of every layer
    compressions = 0
    positions = None
    keys = values = None  # no per-token keys or values (as transformers' DummyLayer)

    def flush(self) -> None:
        """Nothing to compress: the state does not grow with the length."""

    def kept_positions(self) -> torch.Tensor:
        raise ValueError(f"layer {self.layer_idx} is a linear-attention layer: it keeps a state, not tokens")

    def tensors(self) -> list[torch.Tensor]:
        """The tensors held now (conv and recurrent states)."""
        held = [*self.conv_states.values(), *self.recurrent_states.values()]
        return [t for t in held if isinstance(t, torch.Tensor)]

    def nbytes(self) -> int:
        """Bytes of the conv and recurrent states (independent of the tokens seen)."""
        return nbytes_of(self.tensors())

    def _apply_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for states in (self.conv_states, self.recurrent_states):
            for i, t in states.items():
                if isinstance(t, torch.Tensor):
                    states[i] = fn(t)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda x: x[indices.to(x.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def reset(self) -> None:
        self.__init__(self.cache, self.layer_idx, self.number_of_states)
