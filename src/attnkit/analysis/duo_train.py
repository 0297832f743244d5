"""DuoAttention's own head identification: optimise one gate per KV head on synthetic
passkey retrieval (docs/analysis.md, "DuoAttention's optimisation").

Paper: Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads", arXiv:2410.10819 (2024), section 3.2. Rule: the model is frozen;
each KV head (layer l, head h) gets a gate alpha in [0, 1] (initially 1) and its query
heads' attention output becomes

    alpha * full_attention + (1 - alpha) * streaming_attention(sink, recent)

(StreamingLLM: the first ``sink`` keys plus the ``recent`` most recent ones). Only the
gates train, on passkey prompts (a haystack with passkeys inserted, then the questions
and their answers), with

    loss = mean over supervised positions of mean_d (h_full - h_gated)^2  +  reg * mean |alpha|

where h are the final hidden states (after the final norm) of the frozen model with exact
attention and of the gated model, at the positions of the questions and answers. AdamW
(lr 0.02, no weight decay), the gates clamped to [0, 1] before every step, learning rate
warmed up over the first fifth of the steps and decayed over the last fifth (the
reference code's schedule). Heads with high alpha are retrieval heads: ``duo_plan`` keeps
the top ``retrieval_share`` of *all* KV heads (or those above a threshold, the reference
code's 0.5).

Defaults and deviations (the reference implementation, github.com/mit-han-lab/duo-attention,
trains 7-8B models on 1k-32k-token prompts): lr 0.02, reg 0.05, initial gate 1, AdamW
without weight decay and the warm-up/decay schedule are the paper's; the paper trains
2,000 steps, with sink 128 / recent 256 (reference config), 10 passkeys of 32 words and
BookSum text. Here, sized for a small model on a CPU: ``steps=30``, prompts of
``length=1024`` tokens (a fixed length, not 1k-32k), ``passkeys=4`` of ``words=8``
words, license text as the haystack (``bench.haystack``), and ``sink=16`` / ``recent=128``
so the streaming part sees about a seventh of the prompt (the paper's 384 of up to 32k
tokens is far less: at 1k tokens, 128 + 256 keys would cover most passkeys' distance).
The gated attention runs through transformers' ``AttentionInterface`` with attnkit's
kernels: exact attention (``layer_attention.exact``) for the full part, the ``streaming``
prefill method for the streaming part; gradients reach the gates only (the model's
parameters are frozen during training and restored after).
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import torch

GATED_FN = "attnkit_duo_gates"
DEFAULT_SHARE = 0.25  # retrieval heads: a quarter of all KV heads (the duo policy's retrieval_ratio default)
GATE_ATTR = "_attnkit_duo_gate"  # on each attention module during `gated`: (_GateState, layer index)

PASSKEY_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
                 "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
                 "uniform", "victor", "whiskey", "xray", "yankee", "zulu")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
            "eighteenth", "nineteenth", "twentieth")

Sample = tuple[torch.Tensor, torch.Tensor]  # input_ids (1, N) long, supervised (1, N) bool
Data = Union[Any, Callable[[int], Sample]]


# --- data ---------------------------------------------------------------------------


def passkey_sample(tokenizer: Any, length: int = 1024, seed: int = 0, passkeys: int = 4, words: int = 8,
                   haystack: str = "licenses", depths: tuple[float, float] = (0.05, 0.95)) -> Sample:
    """A seeded multi-passkey prompt of about ``length`` tokens (DuoAttention's training data).

    ``passkeys`` passkeys of ``words`` random NATO-alphabet words are inserted into
    ``haystack`` text (``attnkit.bench.haystack``) at sorted random depths in ``depths``;
    after the text, each is asked back and answered ("Based on the content of the book,
    what is the first passkey to the vault?\\nPasskey: ..."), in order. Returns input_ids
    (1, N) and the supervised positions (1, N) bool: the questions and answers.
    """
    from ..bench import haystack as hay

    if not 1 <= passkeys <= len(ORDINALS):
        raise ValueError(f"passkey_sample: passkeys must be in 1..{len(ORDINALS)}, got {passkeys!r}")
    if words < 1:
        raise ValueError(f"passkey_sample: words must be >= 1, got {words!r}")
    rng = random.Random(seed)
    keys = [" ".join(rng.choice(PASSKEY_WORDS) for _ in range(words)) for _ in range(passkeys)]
    needles = [f"Remember this sequence of words, it's the {ORDINALS[i]} passkey to the vault: {key}."
               for i, key in enumerate(keys)]
    qa = "".join(f"Based on the content of the book, what is the {ORDINALS[i]} passkey to the vault?\n"
                 f"Passkey: {key}\n\n" for i, key in enumerate(keys))
    head, tail = "This is a very long story book: <book> ", " </book>.\n\n"
    qa_ids = hay.encode(tokenizer, qa)
    fixed = len(hay.encode(tokenizer, head + tail + " ".join(needles))) + len(qa_ids)
    n_text = length - fixed
    if n_text < 16:
        raise ValueError(f"passkey_sample: length={length} leaves {n_text} tokens of haystack after the "
                         f"{passkeys} passkeys and questions ({fixed} tokens); raise length or lower passkeys/words")
    at = sorted(rng.uniform(*depths) for _ in range(passkeys))
    text, _ = hay.insert(hay.context(tokenizer, n_text, seed=seed, kind=haystack), list(zip(at, needles)))
    context_ids = hay.encode(tokenizer, head + text + tail)
    ids = torch.tensor([context_ids + qa_ids])
    supervised = torch.zeros_like(ids, dtype=torch.bool)
    supervised[:, len(context_ids):] = True
    return ids, supervised


# --- the gated attention -------------------------------------------------------------


def mix(full: torch.Tensor, streaming: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """alpha * full + (1 - alpha) * streaming, one alpha per KV head.

    full, streaming: (B, Hq, N, D); alpha: (Hkv,) with Hq % Hkv == 0 (query head ``h``
    reads alpha[h // (Hq / Hkv)])."""
    hq = full.shape[1]
    a = alpha.to(full.dtype).repeat_interleave(hq // alpha.shape[0]).view(1, hq, 1, 1)
    return a * full + (1 - a) * streaming


def gated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sink: int = 16,
                    recent: int = 128, causal: bool = True, scale: Optional[float] = None) -> torch.Tensor:
    """Operator-level DuoAttention training attention: exact attention mixed per KV head with
    ``streaming(sink, window=recent)``. q: (B, Hq, N, D); k, v: (B, Hkv, N, D); alpha: (Hkv,)."""
    from .. import api

    if alpha.shape != (k.shape[1],):
        raise ValueError(f"gated_attention: alpha must have shape ({k.shape[1]},) (one gate per KV head), "
                         f"got {tuple(alpha.shape)}")
    full = api.attention(q, k, v, method="full", causal=causal, scale=scale)
    stream = api.attention(q, k, v, method="streaming", causal=causal, scale=scale, sink=sink, window=recent)
    return mix(full, stream, alpha)


@dataclass
class _GateState:
    gates: Optional[torch.Tensor]  # (L, Hkv); None: exact attention everywhere (the full model)
    sink: int
    recent: int


def _gated_fn(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
              is_causal: Optional[bool] = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function of ``gated``: attnkit's exact attention for the
    full part (as ``attnkit_attention`` runs an exact layer), the ``streaming`` method
    (``layer_attention.prefill``) for the streaming part, mixed per KV head."""
    from ..layer_attention import LayerMethod, exact, prefill, read_call

    state, idx = getattr(module, GATE_ATTR)
    call = read_call(module, is_causal, kwargs)
    if call.cross:
        raise ValueError("DuoAttention gates: cross-attention layers are not supported (decoder-only models)")
    if call.window is None:
        full = exact(query, key, value, attention_mask, call, scaling, dropout)
    else:  # the model's own sliding-window layer: its exact window
        full = prefill(None, query, key, value, attention_mask, call, scaling)
    if state.gates is None:
        out = full
    else:
        spec = LayerMethod("streaming", {"sink": state.sink, "window": state.recent})
        out = mix(full, prefill(spec, query, key, value, attention_mask, call, scaling), state.gates[idx])
    return out.transpose(1, 2).contiguous(), None


def model_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(attention layers, KV heads per layer) of a model the gates can train on; a
    ValueError says why a model is not supported."""
    from .. import hybrid, model_layers

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"DuoAttention gates need a transformers model, got {type(model).__name__}")
    modules = model_layers.attention_modules(model)  # ValueError when none carries a layer_idx
    for reason in (model_layers.unsupported_reason(model), model_layers.exact_only_reason(model)):
        if reason is not None:
            raise ValueError(f"DuoAttention gates cannot train on {type(model).__name__}: {reason}")
    if hybrid.hybrid_layers(model):
        raise ValueError(f"DuoAttention gates cannot train on {type(model).__name__}: it has linear-attention layers "
                         "(a hybrid model); the gates cover softmax attention layers only")
    if model_layers.cross_attention_modules(model):
        raise ValueError(f"DuoAttention gates cannot train on {type(model).__name__}: it has cross-attention "
                         "(encoder-decoder); use a decoder-only causal LM")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if not isinstance(kv, int) or kv < 1 or not isinstance(heads, int) or heads % kv:
        raise ValueError(f"DuoAttention gates: cannot read the KV-head count of {type(model).__name__} "
                         f"(num_attention_heads={heads!r}, num_key_value_heads={kv!r})")
    layers = max(modules) + 1
    if sorted(modules) != list(range(layers)):
        raise ValueError(f"DuoAttention gates: the attention layers of {type(model).__name__} are not numbered "
                         f"0..{layers - 1} (found {sorted(modules)})")
    return layers, kv


@contextmanager
def gated(model: torch.nn.Module, gates: Optional[torch.Tensor], sink: int = 16,
          recent: int = 128) -> Iterator[torch.nn.Module]:
    """Run ``model`` with gated attention inside the block: every KV head's output is
    ``gates[l, h] * exact + (1 - gates[l, h]) * streaming(sink, recent)``; ``gates`` None
    runs exact attention (the full model). gates: (layers, KV heads), any float dtype;
    differentiable. The model's attention implementation is restored on exit."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    layers, kv = model_shape(model)
    if gates is not None and tuple(gates.shape) != (layers, kv):
        raise ValueError(f"DuoAttention gates: expected shape ({layers}, {kv}) (layers, KV heads), got "
                         f"{tuple(gates.shape)}")
    _check_window(sink, recent)
    state = _GateState(gates, sink, recent)
    AttentionInterface.register(GATED_FN, _gated_fn)
    ALL_ATTENTION_FUNCTIONS[GATED_FN] = _gated_fn  # as analysis.profile: a re-wrapped entry shadows register()
    AttentionMaskInterface.register(GATED_FN, sdpa_mask)
    from .. import model_layers

    tagged = [m for idx, group in model_layers.attention_modules(model).items() for m in group]
    for module in tagged:
        setattr(module, GATE_ATTR, (state, module.layer_idx))
    before = model.config._attn_implementation
    try:
        model.set_attn_implementation(GATED_FN)
        if model.config._attn_implementation != GATED_FN:
            raise ValueError(f"{type(model).__name__} cannot switch attention implementation (it does not use "
                             "transformers' AttentionInterface): DuoAttention gates cannot train on it")
        yield model
    finally:
        if model.config._attn_implementation != before and before is not None:
            model.set_attn_implementation(before)
        for module in tagged:
            if GATE_ATTR in vars(module):
                delattr(module, GATE_ATTR)


def _check_window(sink: Any, recent: Any) -> None:
    for name, value in (("sink", sink), ("recent", recent)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"DuoAttention gates: {name} must be an integer >= 1, got {value!r}")


# --- the loss ------------------------------------------------------------------------


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, N, hidden) final hidden states (after the final norm) of ``model``: its base
    model's ``last_hidden_state`` (no LM head, no logits)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(base, torch.nn.Module) and base is not model:
        return base(input_ids=input_ids, use_cache=False).last_hidden_state
    return model(input_ids=input_ids, use_cache=False, output_hidden_states=True).hidden_states[-1]


def full_hidden(model: torch.nn.Module, input_ids: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """(S, hidden) float32 targets: the full model's final hidden states at the supervised
    positions (exact attention, no gradient)."""
    with torch.no_grad(), gated(model, None):
        return final_hidden(model, input_ids)[supervised].float()


def duo_loss(model: torch.nn.Module, gates: torch.Tensor, input_ids: torch.Tensor, supervised: torch.Tensor,
             target: torch.Tensor, sink: int = 16, recent: int = 128,
             reg: float = 0.05) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, distill, l1): distill = mean over the supervised positions of the mean squared
    difference (over the hidden size) between the gated model's final hidden states and
    ``target`` (``full_hidden``); l1 = mean |gates|; loss = distill + reg * l1."""
    with gated(model, gates, sink, recent):
        hidden = final_hidden(model, input_ids)[supervised]
    distill = (hidden.to(target.dtype) - target).pow(2).mean(dim=-1).mean()
    l1 = gates.abs().mean()
    return distill + reg * l1.to(distill.dtype), distill, l1


# --- training ------------------------------------------------------------------------


def _sampler(data: Data, length: int, passkeys: int, words: int, haystack: str, seed: int) -> Callable[[int], Sample]:
    if callable(data) and not hasattr(data, "encode"):
        return data
    if hasattr(data, "encode") and hasattr(data, "decode"):
        return lambda step: passkey_sample(data, length, seed + step, passkeys, words, haystack)
    raise ValueError("train_duo_gates: data must be a tokenizer (passkey prompts are built with it) or a "
                     f"callable step -> (input_ids (1, N), supervised (1, N) bool); got {type(data).__name__}")


def _check_sample(sample: Any, device: torch.device) -> Sample:
    if not (isinstance(sample, tuple) and len(sample) == 2 and all(torch.is_tensor(t) for t in sample)):
        raise ValueError("train_duo_gates: a sample must be (input_ids, supervised) tensors")
    ids, sup = sample
    if ids.dim() != 2 or sup.shape != ids.shape or sup.dtype != torch.bool:
        raise ValueError(f"train_duo_gates: input_ids must be (B, N) and supervised a bool tensor of the same shape; "
                         f"got {tuple(ids.shape)} and {tuple(sup.shape)} {sup.dtype}")
    if not bool(sup.any()):
        raise ValueError("train_duo_gates: a sample has no supervised position")
    return ids.to(device), sup.to(device)


def lr_factor(step: int, steps: int) -> float:
    """The reference code's schedule: linear warm-up over the first fifth of the steps,
    linear decay over the last fifth, never below 0.1."""
    ramp = max(steps // 5, 1)
    return min(1.0, max((step + 1) / ramp, 0.1), max((steps - step) / ramp, 0.1))


def train_duo_gates(model: torch.nn.Module, data: Data, *, steps: int = 30, length: int = 1024, passkeys: int = 4,
                    words: int = 8, haystack: str = "licenses", sink: int = 16, recent: int = 128, lr: float = 0.02,
                    reg: float = 0.05, init: float = 1.0, seed: int = 0, progress: bool = True,
                    history: Optional[list] = None) -> torch.Tensor:
    """Optimise DuoAttention's gates on ``model`` (frozen); returns them, (layers, KV heads)
    float32 in [0, 1] on the CPU. High gate = retrieval head (``duo_plan``).

    ``data``: a tokenizer (each step a new ``passkey_sample(tokenizer, length, seed + step,
    passkeys, words, haystack)``) or a callable ``step -> (input_ids (1, N), supervised
    (1, N) bool)``. ``sink``/``recent``: the streaming part; ``lr``, ``reg`` (lambda of the
    L1 term), ``init`` (initial gate): the paper's defaults. ``progress``: a rich progress
    bar on stderr with the current losses. ``history``: a list that receives one dict per
    step (step, loss, distill, l1, lr, tokens). The model's parameters get no gradient;
    their ``requires_grad`` flags and the model's train/eval mode are restored after.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"train_duo_gates: steps must be an integer >= 1, got {steps!r}")
    _check_window(sink, recent)
    for name, value, ok in (("lr", lr, lr > 0), ("reg", reg, reg >= 0), ("init", init, 0 <= init <= 1)):
        if not ok or not math.isfinite(value):
            raise ValueError(f"train_duo_gates: bad {name}={value!r} (lr > 0, reg >= 0, init in [0, 1])")
    layers, kv = model_shape(model)
    sample_at = _sampler(data, length, passkeys, words, haystack, seed)
    device = next(model.parameters()).device
    gates = torch.nn.Parameter(torch.full((layers, kv), float(init), device=device))
    opt = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    bar = _Bar(steps, progress)
    try:
        with bar, torch.enable_grad():
            for step in range(steps):
                ids, sup = _check_sample(sample_at(step), device)
                target = full_hidden(model, ids, sup)
                with torch.no_grad():
                    gates.clamp_(0.0, 1.0)
                loss, distill, l1 = duo_loss(model, gates, ids, sup, target, sink, recent, reg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                rate = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                record = {"step": step, "loss": loss.detach().item(), "distill": distill.detach().item(),
                          "l1": l1.detach().item(), "lr": rate, "tokens": int(ids.shape[-1])}
                if history is not None:
                    history.append(record)
                bar.advance(f"distill {record['distill']:.4f} | l1 {record['l1']:.3f} | {record['tokens']} tokens")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    with torch.no_grad():
        return gates.detach().clamp(0.0, 1.0).float().cpu()


class _Bar:
    """A transient rich progress bar on stderr (nothing when ``show`` is False)."""

    def __init__(self, total: int, show: bool) -> None:
        self.total, self.show, self.bar, self.task = total, show, None, None

    def __enter__(self) -> "_Bar":
        if self.show:
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("DuoAttention gates", total=self.total)
        return self

    def advance(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"DuoAttention gates: {text}")

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


# --- plans ---------------------------------------------------------------------------


def retrieval_mask(gates: torch.Tensor, retrieval_share: Optional[float] = None,
                   threshold: Optional[float] = None) -> torch.Tensor:
    """(layers, KV heads) bool: the retrieval heads. With ``threshold``: the heads whose
    gate is at least ``threshold`` (the reference code's 0.5); else the
    ``round(retrieval_share x layers x KV heads)`` (default share 0.25) highest gates of the whole model (ties:
    lower layer, then lower head first), not a fixed count per layer."""
    if gates.dim() != 2 or gates.numel() == 0:
        raise ValueError(f"DuoAttention gates must be a (layers, KV heads) tensor, got shape {tuple(gates.shape)}")
    if threshold is not None:
        if retrieval_share is not None:
            raise ValueError("give retrieval_share or threshold, not both")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        return (gates.detach().cpu() >= threshold).view(gates.shape)
    retrieval_share = DEFAULT_SHARE if retrieval_share is None else retrieval_share
    share = retrieval_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise ValueError(f"retrieval_share must be in [0, 1] (a share of all KV heads), got {retrieval_share!r}")
    n = int(math.floor(retrieval_share * gates.numel() + 0.5))
    out = torch.zeros(gates.numel(), dtype=torch.bool)
    out[gates.detach().double().cpu().flatten().argsort(descending=True, stable=True)[:n]] = True
    return out.view(gates.shape)


def duo_plan(gates: torch.Tensor, retrieval_share: Optional[float] = None,
             threshold: Optional[float] = None) -> dict[int, list[int]]:
    """The ``duo`` cache policy's plan ``{layer: [1 = retrieval, 0 = streaming per KV head]}``
    (``KVCache("duo", plan=..., budget=...)``; JSON-ready with ``json.dump``), the retrieval
    heads chosen by ``retrieval_mask``."""
    mask = retrieval_mask(gates, retrieval_share, threshold)
    return {layer: [int(x) for x in row] for layer, row in enumerate(mask.tolist())}


def duo_head_plan(gates: torch.Tensor, retrieval_share: Optional[float] = None, threshold: Optional[float] = None,
                  sink: int = 4, window: int = 256, budget: Optional[int] = None, query_heads: int = 0) -> Any:
    """An ``attnkit.Plan`` from the gates: retrieval heads (``retrieval_mask``) and streaming
    heads; a layer's prefill is ``full`` when most of its KV heads are retrieval heads (ties
    too), else ``streaming(sink, window)``; with ``budget`` the plan's cache is ``duo`` with
    these roles (``Plan.kvcache()``). ``scores`` holds the gates."""
    from ..head_plan import Plan

    mask = retrieval_mask(gates, retrieval_share, threshold)
    roles = [["retrieval" if x else "streaming" for x in row] for row in mask.tolist()]
    prefill = ["full" if 2 * sum(row) >= len(row) else "streaming" for row in mask.tolist()]
    rule = (f"gate >= {threshold}" if threshold is not None else
            f"top {int(mask.sum())} gates of all {mask.numel()} KV heads")
    return Plan(roles=roles, prefill=prefill, prefill_config={"streaming": {"sink": sink, "window": window}},
                cache="streaming", budget=budget, query_heads=query_heads,
                scores=gates.detach().double().cpu().tolist(),
                meta={"rule": f"DuoAttention gates (arXiv 2410.10819): retrieval = {rule}; layer prefill by "
                              "majority role", "retrieval_share": retrieval_share, "threshold": threshold,
                      "score": "duo_gate"})
