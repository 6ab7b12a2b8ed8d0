"""AsyncLLM: the asyncio face of one synchronous ``LLMEngine``.

What it owns:
- ONE background thread (the *engine thread*) that is the only caller of the
  engine. Every engine call (add/abort request, add/remove adapter, encode,
  step) is a command put on a queue and run by that thread between steps, so
  the engine never sees two threads.
- Per-request output streams: each live request has an ``asyncio.Queue`` in the
  event loop that started it; the engine thread fans ``RequestOutput``s into it
  with ``loop.call_soon_threadsafe``.

Invariants:
- The engine thread sleeps on a condition variable when there is no command and
  no unfinished request (the idle loop never spins).
- An error raised by the engine for one request (bad prompt, unknown adapter,
  queue full) is raised to that request's caller only; the engine keeps serving.
- A consumer that stops iterating (cancelled, disconnected, closed early)
  aborts its request in the engine, which frees its KV blocks.
- ``remove_adapter`` rejects new requests of the adapter at once, waits for its
  in-flight requests up to a timeout, aborts the ones still running (they end
  with finish_reason "abort", never an exception), then unloads it.
- After ``shutdown`` starts, new requests raise ``EngineShutdownError``;
  ``close`` (the end of ``shutdown``) also calls ``engine.shutdown()``, which
  stops the worker processes of a tensor-parallel engine.
- A tensor-parallel engine whose rank group broke (``TPWorkerError``: a worker
  died or timed out) is dead for good: the requests in flight fail with
  ``EngineStepError`` naming the cause, later ones with ``EngineDeadError``
  (HTTP 503), and ``accepting`` turns False (``/health`` 503). Nothing hangs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from inlaid.outputs import RequestOutput
from inlaid.sampling import SamplingParams

if TYPE_CHECKING:
    from inlaid.config import EngineConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineShutdownError(RuntimeError):
    """The engine is shutting down (or stopped) and takes no new work."""


class EngineOverloadedError(RuntimeError):
    """The engine's waiting queue is full; retry later."""


class ModelNotFoundError(ValueError):
    """The requested adapter (served model name) is not loaded, or is being unloaded."""


class EngineStepError(RuntimeError):
    """``LLMEngine.step`` itself raised; the requests in flight were failed."""


class EngineDeadError(EngineShutdownError):
    """The engine cannot serve any more (a tensor-parallel rank died); the server must be restarted."""


def queue_full_error_types() -> tuple[type[BaseException], ...]:
    """Exception types meaning "waiting queue full" (the scheduler's, when it exists)."""
    try:
        from inlaid.core.scheduler import QueueFullError  # type: ignore[attr-defined]
    except ImportError:
        return (EngineOverloadedError,)
    return (QueueFullError, EngineOverloadedError)


def _is_tp_failure(exc: BaseException) -> bool:
    """A broken tensor-parallel group (imported lazily: ``inlaid.distributed`` is light, but keep this module so)."""
    from inlaid.distributed.errors import TPWorkerError

    return isinstance(exc, TPWorkerError)


@dataclass
class _Stream:
    """Where one request's outputs go (lives in the loop that called ``add_request``)."""

    request_id: str
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


def _deliver(stream: _Stream, item: RequestOutput | BaseException) -> None:
    """Hand ``item`` to the stream's loop (from any thread); a closed loop drops it."""
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
    except RuntimeError:  # the consumer's event loop is gone
        logger.debug("dropping output for %s: its event loop is closed", stream.request_id)


class RequestStream:
    """Async iterator over one request's outputs; stopping early aborts the request."""

    def __init__(self, owner: "AsyncLLM", stream: _Stream) -> None:
        self._owner = owner
        self._stream = stream
        self.request_id = stream.request_id
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._stream.queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            if not self.finished:
                self.abort()

    def abort(self) -> None:
        """Abort the request (idempotent, callable from ``finally`` blocks)."""
        if not self.finished:
            self.finished = True
            self._owner._forget_stream(self.request_id)
            self._owner._submit_nowait(lambda eng: eng.abort_request([self.request_id]))


class AsyncLLM:
    """Runs one ``LLMEngine`` on a dedicated thread and serves it to asyncio callers."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self._cond = threading.Condition()
        self._commands: deque[Callable[[Any], None]] = deque()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._draining_adapters: set[str] = set()
        self._stats: dict[str, Any] = dict(engine.stats())
        self._accepting = True
        self._dead: str | None = None
        """Why the engine is dead (a broken tensor-parallel group), None while it serves."""
        self._stop = False
        self._engine_closed = False
        self.loop_iterations = 0
        """Engine-thread loop passes (tests check it stays flat while idle)."""
        self._queue_full = queue_full_error_types()
        if hasattr(engine, "waker"):  # background work (re-quantization swaps) wakes the idle engine thread
            engine.waker = lambda: self._submit_nowait(lambda eng: eng.run_between_steps())
        self._thread = threading.Thread(target=self._run, name="inlaid-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: "EngineConfig", adapters: dict[str, str] | None = None) -> "AsyncLLM":
        """Build the ``LLMEngine`` (imported lazily: it pulls in torch) and wrap it."""
        from inlaid.engine.llm_engine import LLMEngine

        return cls(LLMEngine(config, adapters=adapters))

    # ----------------------------------------------------------- engine thread
    def _run(self) -> None:
        has_work = False
        while True:
            with self._cond:
                while not self._commands and not has_work and not self._stop:
                    self._cond.wait()
                commands = list(self._commands)
                self._commands.clear()
                stop = self._stop
            for command in commands:
                command(self.engine)
            if stop:
                break
            self.loop_iterations += 1
            has_work = self._step_once()
        logger.info("engine thread stopped")

    def _step_once(self) -> bool:
        """One engine step (if there is work); returns whether work remains."""
        engine = self.engine
        if self._dead is not None:
            return False
        if engine.has_unfinished_requests():
            try:
                self._dispatch(engine.step())
            except Exception as exc:  # an engine bug must not kill the thread
                logger.exception("engine step failed; failing the requests in flight")
                if _is_tp_failure(exc):
                    self._dead = f"{type(exc).__name__}: {exc}"
                    logger.error("the engine is dead (%s); restart the server", self._dead)
                self._fail_all(EngineStepError(f"engine step failed: {exc}"))
                if self._dead is not None:
                    return False
        self._stats = dict(engine.stats())
        return bool(engine.has_unfinished_requests())

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._streams_lock:
                stream = self._streams.get(out.request_id)
                if stream is not None and out.finished:
                    del self._streams[out.request_id]
            if stream is not None:
                _deliver(stream, out)

    def _fail_all(self, exc: BaseException) -> None:
        with self._streams_lock:
            streams = list(self._streams.values())
            self._streams.clear()
        try:
            self.engine.abort_request([s.request_id for s in streams])
        except Exception:
            logger.exception("abort after a failed step also failed")
        for s in streams:
            _deliver(s, exc)

    # ------------------------------------------------------------ command queue
    def _submit_nowait(self, fn: Callable[[Any], None]) -> None:
        """Queue ``fn(engine)`` for the engine thread, not waiting for it (errors are logged)."""

        def command(engine: Any) -> None:
            try:
                fn(engine)
            except Exception:
                logger.exception("engine command failed")

        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    async def _call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(engine)`` on the engine thread and return (or raise) its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def command(engine: Any) -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(engine))
            except BaseException as exc:  # delivered to the caller only
                future.set_exception(exc)

        with self._cond:
            if self._stop:
                raise EngineShutdownError("the engine is stopped")
            self._commands.append(command)
            self._cond.notify()
        return await asyncio.wrap_future(future)

    def _forget_stream(self, request_id: str) -> None:
        with self._streams_lock:
            self._streams.pop(request_id, None)

    # ----------------------------------------------------------------- requests
    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: str | None = None,
    ) -> RequestStream:
        """Admit a request; raise its error here (ValueError, ModelNotFoundError, overload, shutdown)."""
        self._check_alive()
        if not self._accepting:
            raise EngineShutdownError("the server is shutting down; not accepting new requests")
        stream = _Stream(request_id, adapter, asyncio.get_running_loop())
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = stream
        try:
            await self._call(lambda eng: self._add_on_thread(eng, request_id, prompt, params, adapter))
        except asyncio.CancelledError:
            self._forget_stream(request_id)
            self._submit_nowait(lambda eng: eng.abort_request([request_id]))
            raise
        except BaseException as exc:
            self._forget_stream(request_id)
            if isinstance(exc, self._queue_full) and not isinstance(exc, EngineOverloadedError):
                raise EngineOverloadedError(str(exc)) from exc
            raise
        return RequestStream(self, stream)

    def _add_on_thread(
        self, eng: Any, request_id: str, prompt: str | list[int], params: SamplingParams, adapter: str | None
    ) -> None:
        if adapter is not None and (adapter in self._draining_adapters or adapter not in eng.list_adapters()):
            raise ModelNotFoundError(f"model {adapter!r} does not exist (or is being unloaded)")
        if isinstance(prompt, list) and eng.tokenizer is not None:  # no tokenizer (dummy shapes): the engine checks
            vocab = len(eng.tokenizer)
            bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        eng.add_request(request_id, prompt, params, adapter=adapter)

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes; closing early aborts it."""
        stream = await self.add_request(request_id, prompt, params, adapter)
        async for out in stream:
            yield out

    async def abort(self, request_id: str) -> None:
        """Abort a request (unknown or finished ids are ignored)."""
        self._forget_stream(request_id)
        await self._call(lambda eng: eng.abort_request([request_id]))

    # ------------------------------------------------------------ tokenization
    async def encode(self, prompt: str) -> list[int]:
        """Tokenize a completion prompt (on the engine thread)."""
        return await self._call(lambda eng: list(eng.encode(prompt)))

    async def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Apply the chat template with the generation prompt and tokenize."""
        return await self._call(lambda eng: list(eng.encode_chat(messages)))

    # ---------------------------------------------------------------- adapters
    async def list_adapters(self) -> dict[str, str]:
        """Loaded adapters, name -> path (adapters being unloaded excluded)."""
        adapters = await self._call(lambda eng: dict(eng.list_adapters()))
        return {k: v for k, v in adapters.items() if k not in self._draining_adapters}

    async def add_adapter(self, name: str, path: str, calibration: Any = None) -> None:
        """Validate and register an adapter; servable as soon as this returns.

        With ``calibration`` (JSONL path or inline rows) the base is re-quantized for it in the background.
        """
        if not self._accepting:
            raise EngineShutdownError("the server is shutting down")
        if name == self.model_name:
            raise ValueError(f"adapter name {name!r} is the base model's name; choose another")
        if name in self._draining_adapters:
            raise ValueError(f"adapter {name!r} is being unloaded; retry when that finishes")
        if calibration is None:
            await self._call(lambda eng: eng.add_adapter(name, path))
        else:
            await self._call(lambda eng: eng.add_adapter(name, path, calibration=calibration))

    async def adapter_status(self, name: str) -> dict[str, Any]:
        """Registration and re-quantization status of adapter ``name`` (ModelNotFoundError if unknown)."""
        try:
            return await self._call(lambda eng: eng.adapter_status(name))
        except ValueError as exc:
            from inlaid.lora.errors import UnknownAdapterError  # lazy: the lora package imports torch

            if isinstance(exc, UnknownAdapterError):
                raise ModelNotFoundError(str(exc)) from exc
            raise

    def requant_statuses(self) -> list[dict[str, Any]]:
        """Every re-quantization job's status (thread-safe; empty when none was ever asked for)."""
        rq = getattr(self.engine, "requantizer", None)
        return rq.statuses() if rq is not None else []

    def requant_settings(self) -> dict[str, Any]:
        """The re-quantization worker's bounds in effect (``duty_cycle``, ``requant_threads``); {} if unknown."""
        if getattr(self.engine, "config", None) is None:  # an engine without EngineConfig (test doubles)
            return {}
        from inlaid.engine.requant_hook import requant_settings

        return requant_settings(self.engine)

    async def remove_adapter(self, name: str, timeout: float = 30.0) -> int:
        """Unload an adapter: reject new requests, wait for in-flight ones, abort leftovers.

        Returns how many in-flight requests had to be aborted after ``timeout`` seconds.
        """
        if name in self._draining_adapters or name not in await self._call(lambda eng: dict(eng.list_adapters())):
            raise ModelNotFoundError(f"adapter {name!r} is not loaded")
        self._draining_adapters.add(name)
        try:
            aborted = await self._drain(lambda s: s.adapter == name, timeout)
            await self._call(lambda eng: eng.remove_adapter(name))
        finally:
            self._draining_adapters.discard(name)
        return aborted

    async def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for all in-flight requests; abort the rest; return how many."""
        return await self._drain(lambda s: True, timeout)

    async def _drain(self, match: Callable[[_Stream], bool], timeout: float) -> int:
        """Wait until no matching request is in flight; abort what is left after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._streams_lock:
                if not any(match(s) for s in self._streams.values()):
                    return 0
            await asyncio.sleep(0.02)
        with self._streams_lock:
            leftover = [s.request_id for s in self._streams.values() if match(s)]
        if leftover:
            logger.warning("aborting %d request(s) still running after %.1fs", len(leftover), timeout)
            await self._call(lambda eng: eng.abort_request(leftover))
        # Aborted requests finish with an "abort" output, delivered by the next step.
        while time.monotonic() < deadline + 5.0:
            with self._streams_lock:
                if not any(match(s) for s in self._streams.values()):
                    break
            await asyncio.sleep(0.02)
        return len(leftover)

    # -------------------------------------------------------------- lifecycle
    def stats(self) -> dict[str, Any]:
        """Latest engine stats snapshot (taken by the engine thread) plus live stream count."""
        stats = dict(self._stats)
        with self._streams_lock:
            stats["num_streams"] = len(self._streams)
        return stats

    @property
    def accepting(self) -> bool:
        """False once shutdown has begun, or once the engine is dead."""
        return self._accepting and self._dead is None

    @property
    def dead(self) -> str | None:
        """Why the engine can no longer serve (a broken tensor-parallel group), else None."""
        return self._dead

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is dead ({self._dead}); no request can be served, restart the server")

    def begin_shutdown(self) -> None:
        """Stop accepting new requests (thread-safe, idempotent; in-flight ones continue)."""
        self._accepting = False

    async def shutdown(self, drain_timeout: float = 30.0) -> int:
        """Stop accepting, let in-flight requests finish up to ``drain_timeout``, abort the rest, stop.

        Returns how many requests were aborted.
        """
        self.begin_shutdown()
        aborted = 0
        if self._thread.is_alive():
            aborted = await self._drain(lambda s: True, drain_timeout)
        self.close()
        return aborted

    def close(self) -> None:
        """Stop the engine thread now (requests still in flight get ``EngineShutdownError``)."""
        self._accepting = False
        with self._cond:
            self._stop = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10.0)
        with self._streams_lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for s in streams:
            _deliver(s, EngineShutdownError("the engine stopped"))
        self._shutdown_engine()

    def _shutdown_engine(self) -> None:
        """``engine.shutdown()`` once (stops tensor-parallel workers); after the engine thread stopped."""
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is None or self._engine_closed:
            return
        if self._thread.is_alive():  # stuck in a step: never race it; the workers end with this process
            logger.warning("engine thread did not stop; not shutting the engine down from another thread")
            return
        self._engine_closed = True
        try:
            shutdown()
        except Exception:
            logger.exception("engine shutdown failed")

    def abort_ids(self, request_ids: Iterable[str]) -> None:
        """Abort several requests without waiting (thread-safe)."""
        ids = list(request_ids)
        for rid in ids:
            self._forget_stream(rid)
        self._submit_nowait(lambda eng: eng.abort_request(ids))
