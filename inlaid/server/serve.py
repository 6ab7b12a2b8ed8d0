"""Run the HTTP server with uvicorn, with graceful shutdown on SIGTERM/SIGINT.

Entry points: ``run_server`` (build the engine from an ``EngineConfig``; what
``inlaid serve`` calls) and ``serve_async_llm`` (serve an existing AsyncLLM).

Shutdown sequence on SIGTERM (or SIGINT):
1. the AsyncLLM stops accepting (new requests get 503, ``/health`` 503) and
   uvicorn stops accepting connections;
2. in-flight requests get up to ``drain_timeout`` seconds to finish, the rest
   are aborted (streams end with finish_reason "abort" and ``[DONE]``);
3. the engine thread stops and the process returns normally (exit status 0).

Before serving, the objects alive after startup are frozen against full garbage collections
(``inlaid.engine.gc_heap``), for the process's life.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from inlaid.engine.async_llm import AsyncLLM
from inlaid.engine.gc_heap import freeze_heap
from inlaid.server.app import DEFAULT_MAX_BODY_BYTES, build_app

if TYPE_CHECKING:
    from inlaid.config import EngineConfig

logger = logging.getLogger(__name__)

API_KEY_ENV = "INLAID_API_KEY"


class _GracefulServer(uvicorn.Server):
    """uvicorn.Server that also tells the AsyncLLM to stop accepting on the first signal."""

    def __init__(self, config: uvicorn.Config, llm: AsyncLLM, drain_timeout: float) -> None:
        super().__init__(config)
        self._llm, self._drain_timeout = llm, drain_timeout
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        logger.info("signal %d: draining in-flight requests (up to %.0fs), then exiting", sig, self._drain_timeout)
        self._llm.begin_shutdown()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and self._drain_task is None:
            loop.call_soon_threadsafe(self._start_drain, loop)
        super().handle_exit(sig, frame)

    def _start_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Abort what is still running after the drain timeout, so open streams end with [DONE]."""
        self._drain_task = loop.create_task(self._llm.drain(self._drain_timeout))


def serve_async_llm(
    llm: AsyncLLM,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    *,
    drain_timeout: float = 30.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "info",
) -> None:
    """Serve ``llm`` until SIGTERM/SIGINT; returns normally after a graceful shutdown."""
    app = build_app(llm, api_key=api_key, max_body_bytes=max_body_bytes, drain_timeout=drain_timeout)

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on",
        timeout_graceful_shutdown=int(drain_timeout) + 5,
    )
    server = _GracefulServer(config, llm, drain_timeout)
    # uvicorn re-raises the captured signal after its shutdown, to get the
    # default behaviour; the default SIGTERM action would kill us with status
    # 143, so handle it (and SIGINT) as "already shut down".
    previous = {sig: signal.signal(sig, _already_shut_down) for sig in (signal.SIGTERM, signal.SIGINT)}
    # the engine and the imports are built and live for the whole serve: keep full collections off them, so none
    # stalls a step for ~0.3 s (gc_heap's docstring)
    logger.info("froze %d startup objects against full garbage collections", freeze_heap())
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        llm.close()
    logger.info("server stopped")


def _already_shut_down(sig: int, frame: FrameType | None) -> None:
    logger.info("signal %d after graceful shutdown: exiting normally", sig)


def run_server(
    engine_config: "EngineConfig",
    adapters: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    *,
    drain_timeout: float = 30.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Build the engine from ``engine_config`` (+ adapters name -> PEFT dir) and serve it.

    ``api_key`` None falls back to the ``INLAID_API_KEY`` environment variable.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {port}")
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    llm = AsyncLLM.from_config(engine_config, adapters=adapters)
    logger.info("serving %s on http://%s:%d (adapters: %s)", llm.model_name, host, port, sorted(adapters or {}))
    serve_async_llm(llm, host, port, api_key, drain_timeout=drain_timeout, max_body_bytes=max_body_bytes)
