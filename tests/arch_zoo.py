"""Tiny randomly initialised transformers models of many architectures (the integration
test matrix, tests/test_architectures.py, and docs/architectures.md generated from it).

Each entry: model type, the model class in transformers, its kind (decoder / encoder /
encoder-decoder / refused) and config fields small enough that a forward takes
milliseconds. Decoders with their own sliding window get a window of 8, so that a
prompt of 24 tokens is longer than it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

WINDOW = 8  # the sliding window given to architectures that have one
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)


@dataclass(frozen=True)
class Arch:
    """One architecture of the matrix."""

    name: str  # transformers model_type
    model_class: str  # class name in transformers
    kind: str  # "decoder", "encoder", "encoder-decoder" or "refused"
    config: dict[str, Any] = field(default_factory=dict)
    window: bool = False  # has its own sliding-window layers (WINDOW)
    exact_only: bool = False  # refuses sparse methods (an additive position bias)
    reference: str = "sdpa"  # the implementation whose logits attnkit must equal
    softcap: bool = False  # soft-capped logits: methods run the dense route

    def build(self, seed: int = 0) -> torch.nn.Module:
        import transformers

        torch.manual_seed(seed)
        config = transformers.AutoConfig.for_model(self.name, **self.config)
        config._attn_implementation = self.reference
        model = getattr(transformers, self.model_class)(config).eval()
        return model.to(torch.float64)


def _decoder(name: str, cls: str, **extra: Any) -> Arch:
    window = extra.pop("window", False)
    exact_only = extra.pop("exact_only", False)
    reference = extra.pop("reference", "sdpa")
    softcap = extra.pop("softcap", False)
    return Arch(name, cls, "decoder", {**COMMON, **extra}, window, exact_only, reference, softcap)


DECODERS = [
    _decoder("llama", "LlamaForCausalLM"),
    _decoder("mistral", "MistralForCausalLM", sliding_window=WINDOW, window=True),
    _decoder("qwen2", "Qwen2ForCausalLM"),
    _decoder("qwen3", "Qwen3ForCausalLM", head_dim=16),
    _decoder("gemma2", "Gemma2ForCausalLM", head_dim=16, sliding_window=WINDOW, window=True, softcap=True,
             reference="eager", layer_types=["sliding_attention", "full_attention"]),
    _decoder("gemma3_text", "Gemma3ForCausalLM", head_dim=16, sliding_window=WINDOW, window=True,
             layer_types=["sliding_attention", "full_attention"]),
    _decoder("phi3", "Phi3ForCausalLM", pad_token_id=0),
    _decoder("gpt_neox", "GPTNeoXForCausalLM"),
    _decoder("olmo2", "Olmo2ForCausalLM"),
    _decoder("granite", "GraniteForCausalLM"),
    _decoder("stablelm", "StableLmForCausalLM"),
    _decoder("cohere", "CohereForCausalLM"),
    Arch("gpt2", "GPT2LMHeadModel", "decoder", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)),
]
ENCODERS = [
    Arch("bert", "BertForMaskedLM", "encoder", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=96,
                                                     attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)),
    Arch("modernbert", "ModernBertForMaskedLM", "encoder",
         dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
              global_attn_every_n_layers=3, local_attention=2 * WINDOW, pad_token_id=0, attention_dropout=0.0),
         window=True),
]
T5_LIKE = dict(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, dropout_rate=0.0,
               decoder_start_token_id=0, pad_token_id=0)
BART_LIKE = dict(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, dropout=0.0, attention_dropout=0.0,
                 max_position_embeddings=256, init_std=0.5, pad_token_id=1, decoder_start_token_id=2)
ENCODER_DECODERS = [
    Arch("t5", "T5ForConditionalGeneration", "encoder-decoder", T5_LIKE, exact_only=True),
    Arch("mt5", "MT5ForConditionalGeneration", "encoder-decoder", T5_LIKE, exact_only=True),
    Arch("umt5", "UMT5ForConditionalGeneration", "encoder-decoder", T5_LIKE, exact_only=True),
    Arch("longt5", "LongT5ForConditionalGeneration", "encoder-decoder", T5_LIKE, exact_only=True, reference="eager"),
    Arch("bart", "BartForConditionalGeneration", "encoder-decoder", BART_LIKE),
    Arch("mbart", "MBartForConditionalGeneration", "encoder-decoder", BART_LIKE),
    Arch("marian", "MarianMTModel", "encoder-decoder", {**BART_LIKE, "decoder_vocab_size": 128}),
]
REFUSED = [
    Arch("bloom", "BloomForCausalLM", "refused", dict(vocab_size=128, hidden_size=64, n_layer=2, n_head=4),
         reference="eager"),
    Arch("falcon", "FalconForCausalLM", "refused", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, alibi=True), reference="eager"),
    Arch("mpt", "MptForCausalLM", "refused", dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4),
         reference="eager"),
    Arch("codegen", "CodeGenForCausalLM", "refused", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                          rotary_dim=8), reference="eager"),
    Arch("gptj", "GPTJForCausalLM", "refused", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
         reference="eager"),
    Arch("gpt_oss", "GptOssForCausalLM", "refused",
         {**COMMON, "head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1, "sliding_window": WINDOW,
          "layer_types": ["sliding_attention", "full_attention"]}, reference="eager"),
]
ALL = DECODERS + ENCODERS + ENCODER_DECODERS + REFUSED
