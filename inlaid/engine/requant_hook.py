"""Engine side of dynamic task addition: attach a ``Requantizer`` to an ``LLMEngine``.

Owns the glue between the engine and ``inlaid.quant.requant``: turning the
user's calibration (a JSONL path or inline rows) into token samples, creating
the engine's requantizer on first use (only for a served GPTQ checkpoint with a
``quantize_report.json`` and ``hessians/`` store), registering its swap drain
in ``engine.between_steps`` and the order of an addition with calibration:
calibration data is read and checked first, then the adapter is registered
(servable at once on the current base), then the job is queued; if queueing
fails the adapter is unregistered again, so a bad request changes nothing.

Invariants: everything here runs on the engine's thread (``LLMEngine`` is not
thread-safe); only the requantizer's worker runs elsewhere, and it touches the
served model only through the swaps drained in ``between_steps``.

Tensor parallelism: this process (rank 0) runs the requantizer exactly as at
TP=1 (full layers, checkpoint and store written once, here); its swaps go to
every rank through ``inlaid.distributed.requant.TPSwapTarget``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from inlaid.engine.llm_engine import LLMEngine
    from inlaid.quant.requant import Requantizer

logger = logging.getLogger(__name__)

Calibration = str | Path | Sequence[Any]
"""A JSONL path, or inline rows: ``{"prompt", "completion"}`` / ``{"text"}`` / ``{"input_ids"}`` / token-id lists."""


def load_samples(calibration: Calibration, tokenizer: Any, max_samples: int = 128, max_tokens: int = 65536,
                 max_seq_len: int = 512) -> list[list[int]]:  # fmt: skip
    """Token-id samples from a calibration path or inline rows (``CalibrationError`` names the problem)."""
    from inlaid.quant.calibrate import load_calibration
    from inlaid.quant.requant import samples_from_rows

    if isinstance(calibration, (str, Path)):
        return load_calibration(calibration, tokenizer, max_samples, max_tokens, max_seq_len)
    return samples_from_rows(list(calibration), tokenizer, max_samples, max_tokens, max_seq_len)


def attach_requantizer(engine: "LLMEngine", **options: Any) -> "Requantizer":
    """Create the engine's requantizer for its served checkpoint and drain its swaps between steps.

    ``duty_cycle`` and ``num_threads`` default to the engine's ``requant_duty_cycle`` / ``requant_threads``
    (``ModelConfig``); ``options`` override them and pass anything else to ``Requantizer``.
    """
    from inlaid.model.loader import resolve_model_path
    from inlaid.quant.linear import is_gptq_dir
    from inlaid.quant.requant import Requantizer

    path = resolve_model_path(engine.config.model.model)
    if engine.config.model.load_format == "dummy" or not is_gptq_dir(path):
        raise ValueError(f"model {engine.config.model.model!r} is not a quantized checkpoint: calibration data "
                         "re-quantizes a base written by `inlaid quantize`; serve that checkpoint, or add the "
                         "adapter without calibration")  # fmt: skip
    options.setdefault("duty_cycle", engine.config.model.requant_duty_cycle)
    options.setdefault("num_threads", engine.config.model.requant_threads)
    parts = engine.parts
    graphs = getattr(engine.runner, "graphs", None)  # a CUDA-graph engine: the worker must not run beside a capture
    if graphs is not None and getattr(graphs, "capture_lock", None) is not None:
        options.setdefault("capture_gate", graphs.capture_lock)
    if parts.tp_group is not None and "swap_target" not in options:  # rank 0 quantizes; every rank swaps its shard
        from inlaid.distributed.requant import TPSwapTarget

        options["swap_target"] = TPSwapTarget(path, parts.arch, parts.model, engine.runner, parts.dtype)
    rq = Requantizer(path, parts.arch, parts.model, device=parts.device, serve_dtype=parts.dtype,
                     on_ready=lambda: engine.waker() if engine.waker is not None else None, **options)  # fmt: skip
    engine.between_steps.append(SwapDrain(rq))
    return rq


class SwapDrain:
    """The engine's between-steps callback of a Requantizer: applies the layers that are ready. ``pending``
    tells the engine not to run a step ahead while swaps wait (``LLMEngine``'s overlapped steps)."""

    def __init__(self, requantizer: Any) -> None:
        self.requantizer = requantizer

    def __call__(self) -> int:
        return self.requantizer.apply_ready_swaps()

    def pending(self) -> bool:
        return self.requantizer.has_ready_swaps()


def add_adapter_with_calibration(engine: "LLMEngine", name: str, path: str, calibration: Calibration) -> None:
    """Register ``name`` (servable at once) and queue the background re-quantization of the base for it."""
    samples = load_samples(calibration, engine.tokenizer)
    rq = engine.requantizer if engine.requantizer is not None else attach_requantizer(engine)
    engine.requantizer = rq
    if rq.status(name) is not None and rq.status(name)["quantization"] in ("pending", "running"):  # type: ignore[index]
        raise ValueError(f"task {name!r} is already being added; wait for GET /v1/adapters/{name} to finish")
    adapter = engine.registry.add_path(name, path)
    try:
        rq.submit(name, adapter, samples)
    except Exception:
        engine.registry.remove(name)
        raise
    logger.info("adapter %r servable; re-quantization of the base queued (%d samples)", name, len(samples))


def adapter_status(engine: "LLMEngine", name: str) -> dict[str, Any]:
    """Status JSON of adapter ``name``: registration plus its re-quantization (``"none"`` if never asked)."""
    job = engine.requantizer.status(name) if engine.requantizer is not None else None
    registered = name in engine.registry
    if job is None and not registered:
        engine.registry.get(name)  # raises UnknownAdapterError naming the known adapters
    status = dict(job) if job is not None else {"name": name, "quantization": "none"}
    status["loaded"] = registered
    if engine.requantizer is not None:
        status["base_tasks"] = engine.requantizer.committed_tasks()
    status.update(requant_settings(engine))
    return status


def requant_settings(engine: "LLMEngine") -> dict[str, Any]:
    """The re-quantization worker's bounds in effect: the requantizer's, else what the next one will get."""
    rq, model_cfg = engine.requantizer, engine.config.model
    if rq is not None:
        return {"duty_cycle": rq.duty_cycle, "requant_threads": rq.num_threads}
    return {"duty_cycle": model_cfg.requant_duty_cycle, "requant_threads": model_cfg.requant_threads}
