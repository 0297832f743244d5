"""Retrieval score of every head, as the Retrieval Head paper defines it (Wu et al.,
"Retrieval Head Mechanistically Explains Long-Context Factuality", arXiv 2404.15574).

While the model generates its answer to a needle-in-a-haystack prompt, a head performs a
copy-paste at a step when its most attended key (the argmax of its attention row) lies
inside the needle and holds the very token being generated. A head's retrieval score is
the share of the needle's tokens it copied this way: |g_h| / |needle tokens|, g_h the set
of needle positions copied by head h, averaged over the prompts (lengths x depths).

Prompts come from the benchmark's needle builder (``bench/tasks/niah.make_sample``,
"The special magic number is NNNNN."); the needle span is the needle sentence's tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..kernels import attention_with_lse

TRACE_FN = "attnkit_retrieval_trace"


def copy_paste_scores(top: torch.Tensor, generated: torch.Tensor, input_ids: torch.Tensor,
                      span: tuple[int, int]) -> torch.Tensor:
    """(L, Hq) share of the needle tokens each head copied.

    top: (S, L, Hq) the key position each head attended most when generating step s;
    generated: (S,) the tokens generated; input_ids: (N,) the prompt; span: [start, end)
    of the needle's tokens in the prompt. A copy at step s by head h: start <= top < end
    and input_ids[top] == generated[s]; a position counts once.
    """
    start, end = span
    if not 0 <= start < end <= input_ids.shape[0]:
        raise ValueError(f"needle span {span} is not inside the prompt of {input_ids.shape[0]} tokens")
    inside = (top >= start) & (top < end)
    token_at = input_ids[top.clamp(0, input_ids.shape[0] - 1)]
    hit = inside & (token_at == generated[:, None, None])  # (S, L, Hq)
    copied = torch.zeros(top.shape[1], top.shape[2], end - start, dtype=torch.bool)
    s, l, h = torch.nonzero(hit, as_tuple=True)
    copied[l, h, top[s, l, h] - start] = True
    return copied.sum(-1).double() / (end - start)


def trace_generation(model: Any, input_ids: torch.Tensor, max_new_tokens: int,
                     eos_token_id: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation that records every head's most attended key for each generated token.

    input_ids: (1, N). Returns (generated (S,), top (S, L, Hq)): the attention row that
    produces token s is the prompt's last row (s = 0) or the decode step fed token s - 1.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if input_ids.shape[0] != 1:
        raise ValueError(f"trace_generation: one prompt at a time, got a batch of {input_ids.shape[0]}")
    steps: list[dict[int, torch.Tensor]] = []

    def tracing(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        idx = getattr(module, "layer_idx", 0)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        group = query.shape[1] // key.shape[1]
        last = query[0, :, -1:].float()  # the row of the next token; every key is visible to it
        logits = (last @ key[0].float().repeat_interleave(group, dim=0).transpose(1, 2))[:, 0]  # (Hq, Nk)
        if idx == 0 or not steps:
            steps.append({})
        steps[-1][idx] = logits.argmax(-1)
        t = query.shape[2]
        out, _ = attention_with_lse(query, key, value, scale, causal=attention_mask is None and t > 1,
                                    mask=attention_mask)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(TRACE_FN, tracing)
    ALL_ATTENTION_FUNCTIONS[TRACE_FN] = tracing
    AttentionMaskInterface.register(TRACE_FN, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(TRACE_FN)
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=eos_token_id if eos_token_id is not None else 0,
                                 eos_token_id=eos_token_id)
    finally:
        model.set_attn_implementation(before)
    generated = out[0, input_ids.shape[1]:]
    layers = sorted(steps[0])
    top = torch.stack([torch.stack([step[i] for i in layers]) for step in steps[: len(generated)]])
    return generated, top


def needle_span(tokenizer: Any, prompt: str, char_start: int, char_end: int) -> tuple[list[int], tuple[int, int]]:
    """(prompt token ids, [start, end) token span covering characters char_start..char_end)."""
    try:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(offsets) if b > char_start and a < char_end]
        return list(enc["input_ids"]), (inside[0], inside[-1] + 1)
    except (NotImplementedError, TypeError, KeyError, IndexError):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(prompt[:char_start], add_special_tokens=False)["input_ids"])
        end = len(tokenizer(prompt[:char_end], add_special_tokens=False)["input_ids"])
        return list(ids), (start, max(end, start + 1))


def retrieval_scores(model: Any, tokenizer: Any, *, lengths: Sequence[int] = (1024,),
                     depths: Sequence[float] = (0.1, 0.5, 0.9), seed: int = 0, new_tokens: int = 24,
                     haystack: str = "licenses", template: Optional[Callable[[str], str]] = None,
                     progress: Optional[Callable[[int, float], None]] = None) -> tuple[torch.Tensor, list[dict]]:
    """(L, Hq) retrieval score of every head, averaged over needle prompts of ``lengths`` x
    ``depths``, and one record per prompt (length, depth, answer, found, needle tokens).

    ``template``: the prompt around the user text (default: the tokenizer's chat template
    when it has one, else the text and ``Answer:``). ``progress(length, depth)`` is called
    after each prompt. Generation is greedy, ``new_tokens`` tokens.
    """
    from ..bench.tasks.niah import found, make_sample

    if template is None:
        template = _default_template(tokenizer)
    total, records = None, []
    for length in lengths:
        for depth in depths:
            s = make_sample(tokenizer, length, depth, seed, template=template)
            prompt = template(s.user_text)
            at = prompt.index(s.user_text) + s.offsets[0]
            ids, span = needle_span(tokenizer, prompt, at, at + len(s.needles[0]))
            input_ids = torch.tensor([ids])
            generated, top = trace_generation(model, input_ids, new_tokens, tokenizer.eos_token_id)
            scores = copy_paste_scores(top, generated, input_ids[0], span)
            total = scores if total is None else total + scores
            answer = tokenizer.decode(generated, skip_special_tokens=True)
            records.append({"length": len(ids), "depth": depth, "answer": answer,
                            "found": all(found(a, answer) for a in s.answers), "needle_tokens": span[1] - span[0]})
            if progress is not None:
                progress(length, depth)
    return total / len(records), records


def _default_template(tokenizer: Any) -> Callable[[str], str]:
    if getattr(tokenizer, "chat_template", None):
        return lambda text: tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                          add_generation_prompt=True)
    return lambda text: text.rstrip("\n") + "\n\nAnswer:"
