"""GGUF files converted once into a cached transformers checkpoint, checked at each load.

``convert_gguf(source, target)`` de-quantizes a GGUF file to float32 with transformers
and writes, into a temporary sibling folder renamed into place at the end (so an
interrupted conversion never leaves a half-written cache):

- the checkpoint (``model.safetensors`` + config) and the tokenizer (``tokenizer.json``);
- ``attnkit-probe.pt``: the probe prompt's token ids and the freshly converted model's
  last-position logits on it, so a later load can check that the cache gives the same
  logits as the conversion did (``check_probe``);
- ``attnkit-converted.json`` last: the folder is complete.

Why the GGUF quantizer is dropped: loaded without ``GgufConfig(dequantize=True)``,
transformers 5.x keeps its GGUF quantizer on the model (``model.hf_quantizer``) even
though every weight is a dense float tensor on CPU, and ``save_pretrained`` refuses a
quantized model whose quantizer is not serializable ("quantized with gguf and is not
serializable"). With ``dequantize=True`` (and the quantizer dropped, for versions that
still attach it) the model saves as a plain checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

COMPLETE = "attnkit-converted.json"  # written last into a finished cache folder
PROBE = "attnkit-probe.pt"
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. The capital of France is"
PROBE_ATOL = 1e-3  # float32 logits of the same weights; only thread-order noise differs


def convert_gguf(source: Callable[[Path], Path], target: Path, progress: bool, minutes: str) -> None:
    """Convert the GGUF that ``source(scratch_dir)`` returns into a checkpoint at ``target``.

    ``source`` gets an empty scratch folder (removed afterwards) in which it may write the
    GGUF, e.g. assembled from parts; it returns the GGUF's path. ``minutes`` is the
    expected duration, shown in the message.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(progress, f"attnkit: converting to a transformers checkpoint (first use only, {minutes}) into {target}")
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    scratch = tmp.with_name(tmp.name + "-gguf")
    try:
        scratch.mkdir()
        gguf = source(scratch)
        with progress_bars(progress):
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                attn_implementation="sdpa", local_files_only=True, **_dequantize_kwargs(),
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            _drop_gguf_quantizer(model)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_probe(model.eval(), tokenizer, tmp)
        stamp = {"source": gguf.name, "bytes": gguf.stat().st_size, "seconds": round(time.perf_counter() - start, 1)}
        (tmp / COMPLETE).write_text(json.dumps(stamp, indent=1))
        move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    say(progress, f"attnkit: converted in {time.perf_counter() - start:.0f} s; later loads read the cache")


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
    """Make a model loaded from GGUF savable as a plain checkpoint (see the module doc).

    The weights are plain tensors (checked), so the quantizer and its config entry go.
    """
    for name, module in model.named_modules():
        if type(module).__name__.lower().startswith("gguf"):
            raise RuntimeError(f"layer {name} still holds packed GGUF weights; cannot save it de-quantized")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _probe_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Last-position float32 logits, (vocab,), of ``input_ids`` (1, N)."""
    with torch.no_grad():
        out = model(input_ids=input_ids, logits_to_keep=1, use_cache=False)
    return out.logits[0, -1].float()


def write_probe(model: Any, tokenizer: Any, folder: Path) -> None:
    """Store ``PROBE_TEXT``'s ids and ``model``'s last logits on it in ``folder / PROBE``."""
    ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
    torch.save({"input_ids": ids, "logits": _probe_logits(model, ids)}, folder / PROBE)


def check_probe(model: Any, folder: Path) -> float | None:
    """Max |logit difference| between ``model`` and the probe stored at conversion time.

    None when ``folder`` has no probe (a cache written before probes existed). A
    difference above ``PROBE_ATOL`` is a RuntimeError: the cache does not hold the
    converted weights (delete ``folder`` to convert again).
    """
    path = folder / PROBE
    if not path.is_file():
        return None
    probe = torch.load(path, map_location="cpu", weights_only=True)
    diff = (_probe_logits(model, probe["input_ids"]) - probe["logits"]).abs().max().item()
    if not diff <= PROBE_ATOL:
        raise RuntimeError(
            f"the model loaded from {folder} gives logits {diff:.3g} away from those of its conversion "
            f"(tolerance {PROBE_ATOL}); delete that folder to convert again"
        )
    return diff


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` folder to ``target`` (atomic on one filesystem).

    A leftover ``target`` without its completion stamp (an older, broken cache) is
    removed first; a complete one written meanwhile by another process wins.
    """
    if target.exists():
        if (target / COMPLETE).is_file():
            return
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / COMPLETE).is_file():
            raise


# --- messages ------------------------------------------------------------------------


def say(progress: bool, message: str) -> None:
    """Print ``message`` to stderr when ``progress`` is on."""
    if progress:
        print(message, file=sys.stderr, flush=True)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars on or off for the duration, then as they were."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
