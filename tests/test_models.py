"""attnkit.models: the offline models load, run and cache their conversion."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")

from attnkit import model_convert, models  # noqa: E402


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
    assert (target / model_convert.COMPLETE).is_file()
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
    (tmp / model_convert.COMPLETE).write_text("{}")
    model_convert.move_into_place(tmp, target)
    assert (target / model_convert.COMPLETE).is_file()
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


# --- Gemma 3 270M -----------------------------------------------------------------------


def _config_facts(config) -> models.ModelFacts:
    """The facts as a transformers config states them."""
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return models.ModelFacts(
        context=config.max_position_embeddings, layers=config.num_hidden_layers,
        query_heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim, hidden=config.hidden_size, vocab=config.vocab_size,
        sliding_window=config.sliding_window if "sliding_attention" in kinds else None,
        global_layers=tuple(i for i, kind in enumerate(kinds) if kind == "full_attention"),
    )


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_facts_match_config(fixture, request):
    lm = request.getfixturevalue(fixture)
    assert lm.facts == models.facts(lm.name) == _config_facts(lm.model.config)


def test_gemma3_facts():
    f = models.facts("gemma3-270m")
    assert (f.context, f.layers, f.sliding_window, f.global_layers) == (32768, 18, 512, (5, 11, 17))
    assert (f.query_heads, f.kv_heads, f.vocab) == (4, 1, 262144)
    with pytest.raises(ValueError, match="gemma3-270m"):
        models.facts("minilm")


def test_gemma3_loads_from_cache_with_probe(gemma3):
    assert gemma3.kind == "causal_lm" and gemma3.attn_implementation == "sdpa"
    assert gemma3.path == models.cache_dir() / "models" / "gemma3-270m"
    assert (gemma3.path / model_convert.COMPLETE).is_file()
    diff = model_convert.check_probe(gemma3.model, gemma3.path)  # cached logits vs the conversion's
    assert diff is not None and diff <= model_convert.PROBE_ATOL


def test_probe_mismatch_is_an_error(gemma3, tmp_path):
    probe = torch.load(gemma3.path / model_convert.PROBE, weights_only=True)
    probe["logits"] = probe["logits"] + 0.01
    torch.save(probe, tmp_path / model_convert.PROBE)
    with pytest.raises(RuntimeError, match="delete that folder"):
        model_convert.check_probe(gemma3.model, tmp_path)
    assert model_convert.check_probe(gemma3.model, tmp_path / "none") is None


def test_gemma3_prompt_is_completion_style(gemma3):
    ids = gemma3.prompt("Paris is a city.\n", "Answer: The city is ")
    tok = gemma3.tokenizer
    assert ids.shape[0] == 1 and ids[0, 0].item() == tok.bos_token_id
    assert tok.decode(ids[0, 1:]) == "Paris is a city.\n\nAnswer: The city is"
    assert gemma3.chat_prompt("x") == "x\n\nAnswer:"  # base model: no chat template, a completion prompt


def test_logits_to_keep_equals_last_row(gemma3):
    ids = gemma3.prompt("The quick brown fox jumps over the lazy dog. " * 4, "Answer:")
    with torch.no_grad():
        full = gemma3.model(input_ids=ids, use_cache=False).logits  # (1, N, vocab)
    last = gemma3.next_token_logits(ids)  # (1, vocab)
    assert full.shape[1] == ids.shape[1] and last.shape == (1, 262144)
    torch.testing.assert_close(last[0], full[0, -1], atol=1e-4, rtol=1e-4)


def test_gemma3_finds_needle_in_1k_tokens(gemma3, license_text):
    """Exact attention, ~1k tokens of GPL-3 text, needle at half depth, greedy decoding."""
    tok = gemma3.tokenizer
    hay = tok.decode(tok(license_text[20000:], add_special_tokens=False).input_ids[:1000])
    cut = hay.find(". ", len(hay) // 2) + 2
    text = hay[:cut] + "The special magic number for the blue door is 58213. " + hay[cut:]
    ids = gemma3.prompt(text + "\nWhat is the special magic number for the blue door?",
                        "Answer: The special magic number for the blue door is")
    assert 950 <= ids.shape[1] <= 1100
    with torch.no_grad():
        out = gemma3.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=7, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "58213" in answer, answer


def test_gemma3_patch_runs_window_layers_exactly(gemma3, license_text):
    """``ak.patch(gemma)`` with no method: the 15 window layers run attnkit's
    sliding_window kernel (1,100 tokens: the window of 512 bites), the 3 global layers
    exact; the last-token logits equal transformers' own (fp32 tolerance)."""
    import attnkit as ak

    ids = gemma3.tokenizer(license_text, return_tensors="pt").input_ids[:, :1100]
    want = gemma3.next_token_logits(ids)
    with ak.patch(gemma3.model):
        got = gemma3.next_token_logits(ids)
        plan = gemma3.model.attnkit_assignment
    windowed = [i for i, what in plan.items() if "sliding_window(512)" in what]
    assert windowed == [i for i in range(18) if i not in (5, 11, 17)], plan
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_models_doc_example_runs(gemma3):
    """The Python block of docs/models.md, executed as written (reads the cache)."""
    import pathlib

    text = (pathlib.Path(__file__).parent.parent / "docs" / "models.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/models.md block 0", "exec"), {})
