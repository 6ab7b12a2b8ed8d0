"""Inputs of an incremental re-quantization: inline calibration rows and the unquantized base, one layer at a time.

Owns ``samples_from_rows`` (inline calibration rows -> token ids, the same rules
as a calibration JSONL), ``FpSource`` (fp weights of the source model read one
tensor at a time from its safetensors, or regenerated exactly like
``init_dummy_weights`` for dummy models) and ``lazy_fp_model`` (the fp model
with only the embeddings resident; each decoder layer is loaded when it runs
and the previous one released). Used by ``inlaid.quant.requant``.

Also the worker's two resource bounds (kept here so ``requant.py`` stays one
screenful of job logic): ``DutyCycle`` (after each unit of work, sleep so the
worker uses at most ``duty`` of wall time; clock and sleep injectable for
tests), ``WorkerStream`` (the job's own CUDA stream, created once per job;
on CPU ``stream`` is None and every method is a no-op) and ``CaptureGate``
(the worker holds the serving engine's CUDA-graph capture lock while it issues
GPU work and lets go of it while it rests, so no capture runs beside its CUDA
calls; see ``inlaid.worker.cuda_graphs``).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from safetensors import safe_open

from inlaid.model.arch import ModelArch
from inlaid.model.layers import RotaryEmbedding
from inlaid.model.llama import LlamaForCausalLM
from inlaid.model.loader import DUMMY_STD, hash_name, resolve_model_path
from inlaid.quant.calibrate import CalibrationError, _row_ids
from inlaid.quant.linear import PROJECTIONS


class RequantError(ValueError):
    """A task addition that cannot be re-quantized (the message names what to fix)."""


# ---- resource bounds of the worker ---------------------------------------------------------
class DutyCycle:
    """Pace a worker to at most ``duty`` of wall time: ``start()`` before a unit of work, ``rest()`` after it.

    ``rest()`` sleeps ``busy * (1/duty - 1)`` where ``busy`` is the ``clock()`` time since ``start()``, so
    busy / (busy + sleep) = duty. ``sleep`` may return early (a stop event's ``wait``); duty 1 never sleeps.
    """

    def __init__(self, duty: float, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], object] = time.sleep) -> None:  # fmt: skip
        if not 0 < duty <= 1:
            raise ValueError(f"duty_cycle must be in (0, 1], got {duty}")
        self.duty, self.clock, self.sleep = duty, clock, sleep
        self._t0: float | None = None
        self.busy_s = 0.0
        """Total measured work (seconds of ``clock``)."""
        self.slept_s = 0.0
        """Total requested sleep."""

    def start(self) -> None:
        self._t0 = self.clock()

    def rest(self) -> float:
        """Sleep for the work since ``start()`` (then restart the count); returns the seconds asked for."""
        now = self.clock()
        busy = 0.0 if self._t0 is None else max(now - self._t0, 0.0)
        pause = busy * (1 / self.duty - 1)
        self.busy_s += busy
        if pause > 0:
            self.slept_s += pause
            self.sleep(pause)
        self._t0 = self.clock()
        return pause


class WorkerStream:
    """The re-quantization job's own CUDA stream on ``device`` (None on CPU: ``context`` and ``synchronize``
    are no-ops).

    A new stream has the default priority, which is CUDA's lowest, so serving kernels on the default stream
    are not queued behind the worker's. Tensors the worker hands to the engine must be complete: call
    ``synchronize()`` before a layer goes on the swap queue.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None

    def context(self) -> ContextManager[Any]:
        """Make the stream current for this thread (``torch.cuda.stream``); a null context on CPU."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def synchronize(self) -> None:
        """Wait until all work queued on the stream has finished."""
        if self.stream is not None:
            self.stream.synchronize()


class CaptureGate:
    """The worker's side of a CUDA-graph capture lock (``lock`` None: no graphs, every method is a no-op).

    ``hold()`` wraps a stretch of the worker's GPU work; inside it, ``released()`` lets go for a pause (the
    duty-cycle sleep) and takes the lock back afterwards. The engine only ever *tries* the lock (it runs
    eagerly when the worker has it), so the worker waits at most one capture to get it back.
    """

    def __init__(self, lock: Any = None) -> None:
        self.lock = lock
        self._held = False

    @contextlib.contextmanager
    def hold(self) -> Any:
        if self.lock is None or self._held:
            yield
            return
        self.lock.acquire()
        self._held = True
        try:
            yield
        finally:
            if self._held:
                self._held = False
                self.lock.release()

    @contextlib.contextmanager
    def released(self) -> Any:
        if self.lock is None or not self._held:
            yield
            return
        self._held = False
        self.lock.release()
        try:
            yield
        finally:
            self.lock.acquire()
            self._held = True


# ---- calibration samples ------------------------------------------------------------------
def samples_from_rows(rows: Sequence[Any], tokenizer: Any, max_samples: int = 128, max_tokens: int = 65536,
                      max_seq_len: int = 512) -> list[list[int]]:  # fmt: skip
    """Token-id samples from inline rows: dicts like a calibration JSONL line, or lists of token ids."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise CalibrationError("calibration samples are empty: give at least one row")
    samples: list[list[int]] = []
    budget = max_tokens
    for i, row in enumerate(rows[:max_samples]):
        if budget <= 0:
            break
        if isinstance(row, (list, tuple)):
            row = {"input_ids": list(row)}
        if not isinstance(row, dict):
            raise CalibrationError(f"calibration sample {i}: must be an object or a list of token ids")
        ids = _row_ids(tokenizer, row, f"calibration sample {i}")[: min(max_seq_len, budget)]
        if ids:
            samples.append(ids)
            budget -= len(ids)
    if not samples:
        raise CalibrationError("calibration samples have no tokens; give at least one non-empty row")
    return samples


# ---- the unquantized base, one layer at a time --------------------------------------------
class FpSource:
    """Unquantized base weights, read one tensor at a time from safetensors (or seeded dummy values)."""

    def __init__(self, model: str | Path, load_format: str = "auto", dummy_seed: int = 0) -> None:
        self.path = resolve_model_path(str(model))
        self.files: dict[str, Path] = {}
        for file in sorted(self.path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                self.files.update((k, file) for k in f.keys())
        # A .bin-only base is read through a memory map (pages are loaded only for the tensors used).
        self.bin: dict[str, torch.Tensor] = {} if self.files or load_format == "dummy" else _load_bins(self.path)
        # Dummy values only when asked, or for a config-only directory (a `dummy` base has no weight files);
        # never as a silent stand-in for weights that exist.
        self.dummy = load_format == "dummy" or (load_format == "auto" and not self.files and not self.bin)
        if load_format not in ("auto", "dummy") and not self.files and not self.bin:
            raise RequantError(f"{self.path}: no weights (*.safetensors or pytorch_model*.bin) of the unquantized base")
        self.seed = dummy_seed

    def tensor(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """One parameter by its HF name (as ``init_dummy_weights`` would fill it, for dummy sources)."""
        if self.dummy:
            if name.endswith("norm.weight"):
                return torch.ones(*shape, dtype=dtype, device=device)
            if name.endswith(".bias"):
                return torch.zeros(*shape, dtype=dtype, device=device)
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + (hash_name(name) % 1_000_003))
            return torch.empty(*shape, dtype=dtype, device=device).normal_(0.0, DUMMY_STD, generator=gen)
        if name in self.bin:
            t = self.bin[name]
        elif name in self.files:
            with safe_open(str(self.files[name]), framework="pt") as f:
                t = f.get_tensor(name)
        else:
            raise RequantError(f"{self.path}: the unquantized base has no tensor {name!r}")
        if tuple(t.shape) != tuple(shape):
            raise RequantError(f"{self.path}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t.to(device=device, dtype=dtype)

    def layer_weights(self, arch: ModelArch, idx: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """``{projection: W [out, in]}`` of decoder layer ``idx``."""
        shapes = arch.lora_module_shapes()
        out = {}
        for rel in PROJECTIONS:
            d_in, d_out = shapes[rel.split(".")[1]]
            out[rel] = self.tensor(f"model.layers.{idx}.{rel}.weight", (d_out, d_in), dtype, device)
        return out


def _load_bins(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("pytorch_model*.bin")):
        try:
            out.update(torch.load(str(file), map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # torch raises several types for truncated or foreign pickles
            raise RequantError(f"{file}: cannot read the unquantized base's weights ({e})") from e
    return out


def lazy_fp_model(arch: ModelArch, source: FpSource, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """The fp model with only the embeddings resident; a decoder layer is loaded when it runs and the
    previous one is released, so peak weight memory is the embeddings plus one layer."""
    model = LlamaForCausalLM(arch, device=torch.device("meta"), dtype=dtype)
    inner = model.model
    inner.embed_tokens.to_empty(device=device)
    with torch.no_grad():
        w = inner.embed_tokens.weight
        w.copy_(source.tensor("model.embed_tokens.weight", tuple(w.shape), dtype, device))
    inner.rotary_emb = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta,
                                       arch.rope_scaling, device)  # fmt: skip
    state = {"live": -1}

    def materialize(layer: torch.nn.Module, _args: Any) -> None:
        idx = layer.layer_idx
        if state["live"] == idx:
            return
        if state["live"] >= 0:
            inner.layers[state["live"]].to(device="meta")
        layer.to_empty(device=device)
        with torch.no_grad():
            for name, p in layer.named_parameters(prefix=f"model.layers.{idx}"):
                p.copy_(source.tensor(name, tuple(p.shape), dtype, device))
        state["live"] = idx

    for layer in inner.layers:
        layer.register_forward_pre_hook(materialize)
    return model.eval()
