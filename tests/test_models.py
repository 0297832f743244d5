"""attnkit.models: the offline models load, run and cache their conversion."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")

from attnkit import models  # noqa: E402


def test_smollm2_architecture(smollm2):
    config = smollm2.model.config
    assert smollm2.kind == "causal_lm"
    assert smollm2.name == "smollm2-135m"
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert smollm2.attn_implementation == config._attn_implementation == "sdpa"
    assert not smollm2.model.training
    assert smollm2.tokenizer.padding_side == "left"


def test_smollm2_chat_prompt(smollm2):
    prompt = smollm2.chat_prompt("What is the capital of France?")
    assert "What is the capital of France?" in prompt
    assert prompt.rstrip().endswith("assistant")


def test_smollm2_greedy_answer_is_english(smollm2):
    tok = smollm2.tokenizer
    enc = tok(smollm2.chat_prompt("What is the capital of France?"), return_tensors="pt")
    with torch.no_grad():
        out = smollm2.model.generate(**enc, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip()
    assert text, "empty answer"
    letters = re.findall(r"[A-Za-z]", text)
    assert len(letters) >= 0.6 * len(text.replace(" ", "")), text
    assert "Paris" in text, text


def test_smollm2_second_load_reads_cache(smollm2):
    target = models.cache_dir() / "models" / "smollm2-135m"
    assert (target / "model.safetensors").is_file()
    assert (target / models._COMPLETE).is_file()
    again = models.load("smollm2-135m", progress=False)
    assert again.path == target
    assert again.model.config.num_hidden_layers == 30


def test_load_local_directory(smollm2):
    again = models.load(str(smollm2.path), progress=False)
    assert again.kind == "causal_lm"
    assert again.model.config.num_key_value_heads == 3


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    import transformers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-conversion

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.load("smollm2-135m", progress=False)
    folder = tmp_path / "models"
    assert not (folder / "smollm2-135m").exists()
    assert list(folder.iterdir()) == []  # no temporary folder left behind


def test_move_into_place_replaces_broken_cache(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "half-written").write_text("x")  # no completion stamp: broken
    tmp = tmp_path / ".m.tmp"
    tmp.mkdir()
    (tmp / models._COMPLETE).write_text("{}")
    models._move_into_place(tmp, target)
    assert (target / models._COMPLETE).is_file()
    assert not (target / "half-written").exists()
    assert not tmp.exists()


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("ATTNKIT_CACHE")
    assert models.cache_dir().name == "attnkit"


def test_minilm_embeddings():
    lm = models.load("minilm", progress=False)
    assert lm.kind == "encoder"
    assert lm.chat_prompt("plain text") == "plain text"  # no chat template
    sentences = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    enc = lm.tokenizer(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = lm.model(**enc).last_hidden_state
    assert hidden.shape[0] == 3 and hidden.shape[-1] == 384
    mask = enc.attention_mask[..., None].to(hidden.dtype)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.isfinite(emb).all()
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2  # the two cat sentences are closer


def test_unknown_model_lists_names():
    with pytest.raises(ValueError) as err:
        models.load("gpt-17")
    message = str(err.value)
    for name in models.known_models():
        assert name in message
