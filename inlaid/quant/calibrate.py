"""Calibration for MLGPTQ: per-task token samples and the layer-by-layer Hessian driver.

Owns (1) reading a task's calibration JSONL into token-id samples and (2)
running those samples through the **unquantized** base, with the task's LoRA
adapter active, one decoder layer at a time, accumulating the input Hessian of
every linear-input group (``inlaid.quant.hessian.GROUPS``).

Invariants:
- Samples: a row is ``{"prompt", "completion"}``, ``{"text"}`` or (models
  without a tokenizer, e.g. dummy shapes) ``{"input_ids"}``. With a chat
  template, prompt+completion is rendered exactly as ``inlaid.tasks.prompting``
  does (user message with generation prompt, then completion + EOS, each part
  tokenized without special tokens), so calibration sees the tokens serving and
  evaluation see. At most ``max_samples`` rows and ``max_tokens`` tokens per
  task; every sample is cut to ``max_seq_len`` tokens.
- Layer by layer: the embeddings of all samples are computed once; layer ``i``
  then runs on the outputs of layer ``i-1`` and they replace them. Peak memory is
  one layer's activations of all samples plus that layer's four Hessians (plus
  the weights of the model, which stay where they are).
- The adapter is active in every layer (a one-slot ``LoRAPool``, ``lora_slots``
  = 0 for every token; -1 and no hook without an adapter), so each layer's
  Hessians include the adapter's effect on all earlier layers. This equals
  hooking one full forward of the same batches (a test checks it).
- Hessians are accumulated in fp32 on the model's device by taps on the linear method of
  q_proj ("qkv"), o_proj ("o"), gate_proj ("gate_up") and down_proj ("down");
  ``N`` counts tokens. Hooks are always removed, even on error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from inlaid.lora.adapter import LoRAAdapter
from inlaid.lora.pool import LoRAPool
from inlaid.model.arch import ModelArch
from inlaid.model.batch import ForwardBatch
from inlaid.quant.hessian import HessianAccumulator, HessianStore

logger = logging.getLogger(__name__)

HOOK_POINTS = {"qkv": ("self_attn", "q_proj"), "o": ("self_attn", "o_proj"),
               "gate_up": ("mlp", "gate_proj"), "down": ("mlp", "down_proj")}  # fmt: skip
"""Input group -> (submodule, projection) whose input is that group's activations."""
BLOCK_SIZE = 16

LayerSink = Callable[[int, dict[str, HessianAccumulator]], None]


class CalibrationError(ValueError):
    """Calibration data is missing, empty or malformed (the message names the file and fix)."""


# ---- calibration data -----------------------------------------------------------
def _row_ids(tokenizer: Any, row: dict[str, Any], where: str) -> list[int]:
    ids = row.get("input_ids")
    if isinstance(ids, list) and all(isinstance(t, int) and t >= 0 for t in ids):
        return list(ids)
    if tokenizer is None:
        raise CalibrationError(f"{where}: the model has no tokenizer; give rows as {{\"input_ids\": [...]}}")
    if "text" in row and isinstance(row["text"], str):
        return list(tokenizer(row["text"], add_special_tokens=True)["input_ids"])
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise CalibrationError(f"{where}: each line needs string 'prompt' and 'completion', or a string 'text'")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        eos = tokenizer.eos_token or ""
        p_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(p_ids) + list(tokenizer(completion + eos, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt + completion, add_special_tokens=True)["input_ids"])


def iter_calibration_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("file:line", row)`` for every non-empty line of a calibration JSONL file; CalibrationError naming
    the file and line when it is missing, not JSON, or not an object."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist (expected JSONL with prompt/completion or text)")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise CalibrationError(f"{path}:{lineno}: each line must be a JSON object")
            yield f"{path}:{lineno}", row


def load_calibration(
    path: str | Path, tokenizer: Any, max_samples: int = 128, max_tokens: int = 65536, max_seq_len: int = 512
) -> list[list[int]]:
    """Token-id samples of one task from a JSONL file (caps: samples, total tokens, tokens per sample)."""
    if min(max_samples, max_tokens, max_seq_len) < 1:
        raise ValueError(f"max_samples, max_tokens, max_seq_len must be >= 1, got {max_samples}, "
                         f"{max_tokens}, {max_seq_len}")  # fmt: skip
    path = Path(path)
    samples: list[list[int]] = []
    budget = max_tokens
    for where, row in iter_calibration_rows(path):
        if len(samples) >= max_samples or budget <= 0:
            break
        ids = _row_ids(tokenizer, row, where)[: min(max_seq_len, budget)]
        if ids:
            samples.append(ids)
            budget -= len(ids)
    if not samples:
        raise CalibrationError(f"calibration file {path} has no usable examples; give at least one JSONL line")
    logger.info("calibration %s: %d samples, %d tokens", path.name, len(samples), sum(map(len, samples)))
    return samples


# ---- batches ---------------------------------------------------------------------
def prefill_batch(samples: list[list[int]], device: torch.device | str, lora_slot: int = -1,
                  block_size: int = BLOCK_SIZE) -> tuple[ForwardBatch, int]:  # fmt: skip
    """A ForwardBatch that prefills ``samples`` as separate sequences in fresh contiguous blocks.

    Returns ``(batch, num_blocks)``; ``logits_indices`` lists every token (teacher forcing).
    """
    lens = torch.tensor([len(s) for s in samples], dtype=torch.int64)
    if not len(samples) or int(lens.min()) < 1:
        raise ValueError("prefill_batch needs non-empty samples")
    n_blocks = (lens + block_size - 1) // block_size
    first_block = torch.zeros(len(samples), dtype=torch.int64)
    first_block[1:] = torch.cumsum(n_blocks, 0)[:-1]
    qsl = torch.zeros(len(samples) + 1, dtype=torch.int64)
    qsl[1:] = torch.cumsum(lens, 0)
    seq = torch.repeat_interleave(torch.arange(len(samples)), lens)
    positions = torch.arange(int(qsl[-1])) - qsl[:-1][seq]
    width = int(n_blocks.max())
    tables = first_block[:, None] + torch.arange(width)[None, :]
    tables = torch.where(torch.arange(width)[None, :] < n_blocks[:, None], tables, 0)
    kw: dict[str, Any] = dict(device=device)
    batch = ForwardBatch(
        input_ids=torch.tensor([t for s in samples for t in s], dtype=torch.int64, **kw),
        positions=positions.to(**kw), slot_mapping=(first_block[seq] * block_size + positions).to(**kw),
        query_start_loc=qsl.to(dtype=torch.int32, **kw), seq_lens=lens.to(dtype=torch.int32, **kw),
        block_tables=tables.to(dtype=torch.int32, **kw),
        lora_slots=torch.full((int(qsl[-1]),), lora_slot, dtype=torch.int64, **kw),
        logits_indices=torch.arange(int(qsl[-1]), **kw), max_query_len=int(lens.max()), max_seq_len=int(lens.max()),
    )  # fmt: skip
    return batch, int(n_blocks.sum())


def chunk_samples(samples: list[list[int]], max_batch_tokens: int) -> list[list[list[int]]]:
    """Consecutive groups of samples with at most ``max_batch_tokens`` tokens each (one sample minimum)."""
    chunks: list[list[list[int]]] = [[]]
    used = 0
    for s in samples:
        if chunks[-1] and used + len(s) > max_batch_tokens:
            chunks.append([])
            used = 0
        chunks[-1].append(s)
        used += len(s)
    return chunks


def single_adapter_pool(adapter: LoRAAdapter, arch: ModelArch, device: torch.device | str,
                        dtype: torch.dtype) -> LoRAPool:  # fmt: skip
    """A one-slot pool holding ``adapter`` in slot 0 (raises ``IncompatibleAdapterError`` on a mismatch)."""
    pool = LoRAPool(1, adapter.rank, arch.num_layers, arch.lora_module_shapes(), device, dtype)
    pool.load(0, adapter)
    return pool


# ---- the layer-by-layer driver -----------------------------------------------------
class _InputTap:
    """Feeds the input of one linear to an accumulator by wrapping its ``quant_method.apply`` (instance attribute).

    ``apply`` is what both ``ParallelLinear.forward`` and ``forward_local`` (the path the model takes when a
    LoRA hook or tensor parallelism splits the call) run, so every forward is seen exactly once whichever
    entry point the model uses; module forward hooks would miss ``forward_local``. ``layers.forward_group``
    (q/k/v, gate/up) calls a wrapped method per layer instead of its grouped kernel, for the same reason.
    """

    def __init__(self, module: torch.nn.Module, acc: HessianAccumulator) -> None:
        self.method = module.quant_method
        inner = self.method.apply

        def apply(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            acc.add(x)
            return inner(layer, x)

        self.method.apply = apply

    def remove(self) -> None:
        self.method.__dict__.pop("apply", None)


def _layer_hooks(layer: torch.nn.Module, accs: dict[str, HessianAccumulator]) -> list[Any]:
    return [_InputTap(getattr(getattr(layer, sub), proj), accs[group]) for group, (sub, proj) in HOOK_POINTS.items()]


def _new_accumulators(arch: ModelArch, device: torch.device) -> dict[str, HessianAccumulator]:
    sizes = {"qkv": arch.hidden_size, "o": arch.q_size, "gate_up": arch.hidden_size, "down": arch.intermediate_size}
    return {g: HessianAccumulator(n, device) for g, n in sizes.items()}


@torch.inference_mode()
def capture_task_hessians(
    model: torch.nn.Module,
    arch: ModelArch,
    samples: list[list[int]],
    adapter: LoRAAdapter | None,
    device: torch.device | str,
    dtype: torch.dtype,
    max_batch_tokens: int = 4096,
    sink: LayerSink | None = None,
    desc: str = "calibrate",
) -> dict[int, dict[str, HessianAccumulator]]:
    """Per layer, per group Hessians of ``samples`` through the unquantized base with ``adapter`` active.

    With ``sink``, each finished layer is handed to ``sink(layer_idx, accumulators)`` and not kept
    (the returned dict is then empty), so only one layer's Hessians are alive at a time.
    """
    if not samples or any(not s for s in samples):
        raise CalibrationError("no calibration samples (or an empty one) were given")
    device = torch.device(device)
    hook = single_adapter_pool(adapter, arch, device, dtype) if adapter is not None else None
    chunks = [prefill_batch(c, device, 0 if hook else -1) for c in chunk_samples(samples, max_batch_tokens)]
    inner = model.model
    hidden = [inner.embed_tokens(b.input_ids) for b, _ in chunks]
    rope = [inner.rotary_emb.cos_sin(b.positions, hidden[0].dtype) for b, _ in chunks]
    result: dict[int, dict[str, HessianAccumulator]] = {}
    for idx, layer in enumerate(tqdm(inner.layers, desc=desc, unit="layer", leave=False)):
        accs = _new_accumulators(arch, device)
        handles = _layer_hooks(layer, accs)
        try:
            for j, (batch, n_blocks) in enumerate(chunks):
                if hook is not None:
                    hook.prepare(batch)
                cache = torch.zeros(2, n_blocks, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim, dtype=dtype, device=device)
                hidden[j] = layer(hidden[j], rope[j][0], rope[j][1], cache, batch, hook)
        finally:
            for h in handles:
                h.remove()
        if sink is not None:
            sink(idx, accs)
        else:
            result[idx] = accs
    return result


def calibrate_task(
    model: torch.nn.Module, arch: ModelArch, task: str, samples: list[list[int]], adapter: LoRAAdapter | None,
    store: HessianStore, device: torch.device | str, dtype: torch.dtype, max_batch_tokens: int = 4096,
) -> int:  # fmt: skip
    """Capture ``task``'s Hessians layer by layer straight into ``store`` (replacing an old entry); returns N."""
    if task in store.tasks():
        store.remove_task(task)
    counted: list[int] = []

    def write(idx: int, accs: dict[str, HessianAccumulator]) -> None:
        n = accs["qkv"].n_samples
        store.write_layer(task, idx, {g: a.hessian for g, a in accs.items()}, n)
        counted.append(n)

    capture_task_hessians(model, arch, samples, adapter, device, dtype, max_batch_tokens, sink=write,
                          desc=f"calibrate {task}")  # fmt: skip
    return counted[0] if counted else 0

