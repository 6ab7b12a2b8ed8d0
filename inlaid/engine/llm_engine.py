"""LLMEngine: the synchronous engine. One step = schedule() -> execute() -> update().

Owns the tokenizer, the adapter registry (host memory), the scheduler (pure
Python, ``core/``) and the model runner (device). Callers: ``LLM`` (offline),
``AsyncLLM`` (server), the CLI.

Invariants:
- Every public method validates its input and raises ``ValueError`` (or a typed
  subclass) for bad input before any state changes, so one bad request never
  disturbs the others.
- A failure inside a step (e.g. device out of memory) fails the requests of that
  step with status FINISHED_ERROR and leaves the engine serving.
- Not thread-safe: ``AsyncLLM`` calls it from one thread.
- Tensor parallelism (``parallel.tensor_parallel_size`` > 1): this process is
  rank 0 and the only scheduler; a dead or failed rank raises
  ``inlaid.distributed.TPWorkerError`` out of ``step()`` (never swallowed, never
  a hang). ``shutdown()`` stops the worker processes.
- ``between_steps`` callbacks run at the start of every ``step()`` (and on
  ``run_between_steps()``), before anything is scheduled, and only while no step
  is in flight: the one place where background work (layer swaps of a
  re-quantization) may change the model.
- Overlapped steps (``SchedulerConfig.overlap_steps``; on by default on a single
  CUDA device): ``step()`` launches the step after the current one
  (``Scheduler.schedule_ahead``, steady decode only) *before* waiting for the
  current one's tokens, so the host's bookkeeping, detokenization and the next
  step's input preparation run while the device computes. Each ``step()`` still
  returns the outputs of exactly one step, in order; the step left in flight is
  finished by the next ``step()`` (``has_unfinished_requests`` stays True until
  then). No step runs ahead while a ``between_steps`` callback has work waiting
  (its ``pending()`` is True; a callback without ``pending`` always counts as
  waiting), so such work runs at most two steps late and never beside a step
  that reads the weights; none with a runner that has no ``launch`` (tensor
  parallelism).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Callable, Iterable, Sequence

import torch

from inlaid.config import EngineConfig
from inlaid.core.scheduler import Scheduler
from inlaid.distributed.errors import TPWorkerError
from inlaid.engine.setup import EngineParts, build_engine_parts
from inlaid.engine.tokenizer import IncrementalDetokenizer, encode_chat
from inlaid.outputs import RequestOutput
from inlaid.request import Request, RequestStatus
from inlaid.sampling import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    """Continuous-batching multi-LoRA engine over one base model."""

    def __init__(self, config: EngineConfig | None = None, adapters: dict[str, str] | None = None) -> None:
        self.config = config or EngineConfig()
        parts: EngineParts = build_engine_parts(self.config)
        self.parts = parts
        self.tokenizer = parts.tokenizer
        self.model_name = parts.model_name
        self.max_model_len = parts.max_model_len
        self.registry = parts.registry
        self.runner = parts.runner
        self.scheduler: Scheduler = parts.scheduler
        self._requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._pending: list[RequestOutput] = []
        self._ids = itertools.count()
        self.between_steps: list[Callable[[], object]] = []
        self.waker: Callable[[], None] | None = None
        """Set by a driver that sleeps while idle (AsyncLLM): wakes it to run ``run_between_steps``."""
        self.requantizer: Any = None
        """The ``inlaid.quant.requant.Requantizer`` of the served base, created by the first calibrated add."""
        self.overlap = self._overlap_default()
        """Launch the next (ahead) step before reading this one's tokens (see the module docstring)."""
        self._inflight: tuple[Any, Any] | None = None
        """(SchedulerOutput, StepHandle) of the ahead step launched by the previous ``step()``."""
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)

    # ---- adapters -------------------------------------------------------------
    def add_adapter(self, name: str, path: str, calibration: str | Sequence[Any] | None = None) -> None:
        """Load and validate a PEFT adapter into host memory; servable at once.

        With ``calibration`` (a JSONL path or inline rows) the quantized base is then re-quantized for the new
        task in the background (``inlaid.engine.requant_hook``; under TP rank 0 quantizes and every rank swaps its
        shard); ``adapter_status(name)`` reports progress.
        """
        if calibration is None:
            self.registry.add_path(name, path)
            return
        from inlaid.engine.requant_hook import add_adapter_with_calibration

        add_adapter_with_calibration(self, name, path, calibration)

    def adapter_status(self, name: str) -> dict[str, Any]:
        """Registration and re-quantization status of adapter ``name`` (UnknownAdapterError if neither)."""
        from inlaid.engine.requant_hook import adapter_status

        return adapter_status(self, name)

    def _overlap_default(self) -> bool:
        mode = self.config.scheduler.overlap_steps
        capable = hasattr(self.runner, "launch") and self.config.parallel.tensor_parallel_size == 1
        return capable and (mode == "on" or (mode == "auto" and self.parts.device.type == "cuda"))

    def _between_steps_pending(self) -> bool:
        """Whether a between-steps callback has work waiting (then no step may run ahead of it)."""
        return any(getattr(fn, "pending", None) is None or fn.pending() for fn in self.between_steps)

    def run_between_steps(self) -> None:
        """Run the between-steps callbacks (each one's error is logged, never raised into serving); deferred
        to the next ``step()`` while a step is in flight."""
        if self._inflight is not None:
            return
        for fn in list(self.between_steps):
            try:
                fn()
            except Exception:
                logger.exception("between-steps callback %r failed", fn)

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter; the caller makes sure none of its requests is in flight."""
        if any(r.adapter == name for r in self._requests.values()):
            raise ValueError(f"adapter {name!r} has requests in flight; abort or finish them first")
        self.registry.remove(name)
        self.scheduler.remove_adapter(name)

    def list_adapters(self) -> dict[str, str]:
        """name -> path of every registered adapter."""
        return {name: str(self.registry.get(name).path) for name in self.registry.names()}

    # ---- requests -------------------------------------------------------------
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"model {self.model_name!r} has no tokenizer; pass prompts as token ids")
        return self.tokenizer

    def encode(self, prompt: str) -> list[int]:
        return self._require_tokenizer().encode(prompt)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return encode_chat(self._require_tokenizer(), messages)

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises ValueError for bad input."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if adapter is not None:
            self.registry.get(adapter)  # raises UnknownAdapterError naming the known ones
        token_ids = self._tokenize(prompt)
        self._check_length(len(token_ids), params)
        req = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=self._with_extra_eos(params),
            adapter=adapter,
            eos_token_id=self.parts.eos_token_id,
        )
        self.scheduler.add_request(req)
        self._requests[request_id] = req
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        return request_id

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give at least one character")
            return self.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.parts.arch.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        return ids

    def _check_length(self, n_prompt: int, params: SamplingParams) -> None:
        if n_prompt >= self.max_model_len:
            raise ValueError(
                f"prompt has {n_prompt} tokens but the context is {self.max_model_len}; shorten the prompt"
            )
        if n_prompt + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens; lower max_tokens to at most {self.max_model_len - n_prompt}"
            )

    def _with_extra_eos(self, params: SamplingParams) -> SamplingParams:
        extra = tuple(t for t in self.parts.extra_eos_ids if t not in params.stop_token_ids)
        if not extra or params.ignore_eos:
            return params
        return dataclasses.replace(params, stop_token_ids=params.stop_token_ids + extra)

    def abort_request(self, request_ids: Iterable[str]) -> None:
        """Abort requests (unknown ids are ignored); their final output comes from the next step()."""
        for req in self.scheduler.abort_requests(list(request_ids)):
            self._pending.append(self._finish_output(req, ""))

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending) or self._inflight is not None

    # ---- the step ---------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns outputs of requests that progressed or finished."""
        self.run_between_steps()
        outputs, self._pending = self._pending, []
        current, self._inflight = self._inflight, None
        if current is None:
            sched_out = self.scheduler.schedule()
            if sched_out.is_empty and not sched_out.adapter_loads:
                return outputs
            current = (sched_out, None)
        sched_out, handle = current
        try:
            result = self._run(sched_out, handle)
        except TPWorkerError:
            raise  # the rank group is unusable: fail loudly
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            logger.exception("step failed; failing its %d requests", len(sched_out.scheduled))
            failed = self._fail_step(sched_out, f"step failed: {exc}")
            if self._inflight is not None:  # the ahead step ran the same requests: already failed above
                self._fail_step(self._inflight[0], f"step failed: {exc}")
                self._inflight = None
            return outputs + failed
        outputs.extend(self._process_outputs(sched_out, result))
        return outputs

    def _run(self, sched_out: Any, handle: Any) -> Any:
        """The step's RunnerOutput; with overlap, the ahead step is launched before waiting for it."""
        if not self.overlap:
            return self.runner.execute(sched_out)
        if handle is None:
            handle = self.runner.launch(sched_out)
        if not self._between_steps_pending():
            ahead = self.scheduler.schedule_ahead(sched_out)
            if ahead is not None:
                self._inflight = (ahead, self.runner.launch(ahead, handle))
        return self.runner.collect(handle)

    def _process_outputs(self, sched_out: Any, result: Any) -> list[RequestOutput]:
        """The step's output processing: scheduler update (tokens, stop checks), then detokenize each request."""
        return [self._progress_output(req) for req in self.scheduler.update(sched_out, result)]

    def _fail_step(self, sched_out: Any, message: str) -> list[RequestOutput]:
        failed = []
        for seq in sched_out.scheduled:
            req = self._requests.get(seq.request_id)
            if req is None:
                continue
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_ERROR)
            req.error = message
            failed.append(self._finish_output(req, ""))
        return failed

    def _progress_output(self, req: Request) -> RequestOutput:
        detok = self._detok[req.request_id]
        new_ids = req.output_token_ids[detok.num_tokens :]
        delta = detok.add(new_ids)
        if detok.stopped and not req.is_finished:
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
        if req.is_finished:
            return self._finish_output(req, delta, new_ids)
        return self._make_output(req, delta, new_ids)

    def _finish_output(self, req: Request, delta: str, new_ids: list[int] | None = None) -> RequestOutput:
        out = self._make_output(req, delta, new_ids or [])
        self._requests.pop(req.request_id, None)
        self._detok.pop(req.request_id, None)
        return out

    def _make_output(self, req: Request, delta: str, new_ids: list[int]) -> RequestOutput:
        detok = self._detok[req.request_id]
        status = req.status
        finished = status.finished
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=detok.text,
            delta_text=delta,
            delta_token_ids=list(new_ids),
            finished=finished,
            finish_reason=status.finish_reason if finished else None,
            adapter=req.adapter,
            error=req.error,
            arrival_time=req.arrival_time,
            first_token_time=req.first_token_time,
            finished_time=req.finished_time,
        )

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (no-op at TP=1); idempotent."""
        if self.parts.tp_group is not None:
            if self.requantizer is not None:  # its swaps could not reach the workers any more
                self.requantizer.close()
            self.runner.shutdown()  # TPDriverRunner: terminates (no message) once a step has failed

    def stats(self) -> dict[str, Any]:
        """Queue, KV and adapter residency figures (for /metrics and benchmarks)."""
        total = self.parts.num_blocks
        used = total - self.scheduler.block_manager.num_free_blocks
        return {
            "num_waiting": self.scheduler.num_waiting,
            "num_running": self.scheduler.num_running,
            "kv_usage": used / total,
            "kv_blocks_used": used,
            "kv_blocks_total": total,
            "adapters_resident": sorted(self.scheduler.resident_adapters()),
            "adapters_host": sorted(self.registry.names()),
        }
