"""FastAPI app factory: the OpenAI-compatible HTTP API over one ``AsyncLLM``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter`` (vLLM's names
and bodies; load also takes inlaid's optional ``calibration_path`` or
``calibration_samples``, which start a background re-quantization of the base),
``GET /v1/adapters/{name}`` (its status), ``GET /health``, ``GET /metrics``.

Invariants:
- Each app has its own Prometheus registry and handler state (no globals), so
  several apps can live in one process (tests).
- Every error response has the OpenAI body ``{"error": {...}}`` (see errors.py
  for the status rule); unknown routes are 404 with that body too.
- Unloading an adapter: new requests for it get 404 at once; in-flight ones are
  given ``unload_timeout`` seconds to finish, then aborted (they end with
  finish_reason "abort"); then it is removed. Nothing in flight crashes.
- On app shutdown (lifespan), the AsyncLLM drains for ``drain_timeout`` seconds,
  aborts what is left, and stops its engine thread.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from inlaid.engine.async_llm import AsyncLLM
from inlaid.server import protocol
from inlaid.server.errors import APIError, error_response, from_exception
from inlaid.server.generation import GenerationHandler, parse_body
from inlaid.server.metrics import ServerMetrics
from inlaid.server.middleware import GuardMiddleware
from inlaid.server.requant_routes import RequantCollector, add_requant_routes

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20


def build_app(
    async_llm: AsyncLLM,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    unload_timeout: float = 30.0,
    drain_timeout: float = 30.0,
) -> FastAPI:
    """Build the ASGI app. ``api_key`` None or "" means no authentication."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        aborted = await async_llm.shutdown(drain_timeout)
        logger.info("engine stopped (%d request(s) aborted at shutdown)", aborted)

    app = FastAPI(title="inlaid", lifespan=lifespan)
    metrics = ServerMetrics()
    app.state.llm, app.state.metrics = async_llm, metrics
    handler = GenerationHandler(async_llm, metrics)
    _add_error_handlers(app)
    _add_generation_routes(app, handler)
    _add_model_routes(app, async_llm, unload_timeout)
    _add_ops_routes(app, async_llm, metrics)
    add_requant_routes(app, async_llm)
    metrics.registry.register(RequantCollector(async_llm))
    app.add_middleware(GuardMiddleware, api_key=api_key or None, max_body_bytes=max_body_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc.status, exc.message, exc.code, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return error_response(exc.status_code, str(exc.detail), code)


def _add_generation_routes(app: FastAPI, handler: GenerationHandler) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handler.handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handler.handle(request, "chat")


def _add_model_routes(app: FastAPI, llm: AsyncLLM, unload_timeout: float) -> None:
    created = int(time.time())

    @app.get("/v1/models")
    async def models() -> Response:
        base = {"id": llm.model_name, "object": "model", "created": created, "owned_by": "inlaid",
                "root": llm.model_name, "parent": None, "max_model_len": llm.max_model_len}
        data = [base] + [
            {"id": name, "object": "model", "created": created, "owned_by": "inlaid", "root": path,
             "parent": llm.model_name, "max_model_len": llm.max_model_len}
            for name, path in (await llm.list_adapters()).items()
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        body = await parse_body(request, protocol.LoadLoRARequest)
        try:
            calibration = body.calibration()
            if calibration is None:
                await llm.add_adapter(body.lora_name, body.lora_path)
            else:
                await llm.add_adapter(body.lora_name, body.lora_path, calibration=calibration)
        except Exception as exc:
            raise from_exception(exc) from exc
        logger.info("loaded adapter %s from %s", body.lora_name, body.lora_path)
        extra = "" if calibration is None else f" Re-quantization queued: GET /v1/adapters/{body.lora_name}."
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.{extra}")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        body = await parse_body(request, protocol.UnloadLoRARequest)
        try:
            aborted = await llm.remove_adapter(body.lora_name, timeout=unload_timeout)
        except Exception as exc:
            raise from_exception(exc) from exc
        logger.info("unloaded adapter %s (%d in-flight request(s) aborted)", body.lora_name, aborted)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _add_ops_routes(app: FastAPI, llm: AsyncLLM, metrics: ServerMetrics) -> None:
    @app.get("/health")
    async def health() -> Response:
        if llm.dead is not None:
            return error_response(503, f"the engine is dead ({llm.dead}); restart the server", "engine_dead")
        if not llm.accepting:
            return error_response(503, "the server is shutting down", "shutting_down")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.refresh(llm.stats())
        return Response(metrics.render(), media_type=metrics.content_type)
